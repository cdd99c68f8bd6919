"""The engine's own C++ kernels: attention of each query row (a decoding sequence's token, or a prompt
chunk's, causally) reading the paged cache in place (`paged_attention.cpp`), the element-wise work
of a Llama-family layer fused (`fused_ops.cpp`: residual add with RMS norm, rotary embedding, SiLU
times up), the weights' bf16 products on a CPU with avx512_bf16 (`pair_products.cpp`), and a Llama-family
model's layers through all of these in one call (`layer_stack.cpp`). Built once
per CPU kind and source with the system's C++ compiler into the compile cache (inductor's directory:
`TORCHINDUCTOR_CACHE_DIR`, which the worker points at its data directory), loaded with ctypes and
called with the tensors' pointers: a call costs a few microseconds, where a compiled graph's wrappers
cost tens.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from llmos.common.devices import cpu_kind

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("paged_attention.cpp", "fused_ops.cpp",
                                                              "pair_products.cpp", "layer_stack.cpp", "picks.cpp"))
# What the sources include: part of what a build is keyed by.
HEADERS = (Path(__file__).with_name("bf16.h"),)
# The fused operators round each product as torch does: no product fused into a sum (FMA); the
# products add their blocks' sums in order, as oneDNN does.
OWN_FLAGS = {"fused_ops.cpp": ("-ffp-contract=off",), "pair_products.cpp": ("-fno-fast-math", "-ffp-contract=off"),
             "picks.cpp": ("-fno-fast-math",)}
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
    sources = b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
    # -march=native: a build is for the CPU kind it was made on (a data directory may move).
    flags = (COMPILE, OWN_FLAGS, LINK)
    key = hashlib.sha256(sources + repr((compiler, flags, cpu_kind(), _cpu_flags())).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        objects = [target.with_suffix(f".{os.getpid()}.{source.stem}.o") for source in SOURCES]
        try:
            commands = [[compiler, *COMPILE, *OWN_FLAGS.get(source.name, ()), str(source), "-o", str(o)]
                        for source, o in zip(SOURCES, objects, strict=True)]
            for command in [*commands, [compiler, *LINK, *map(str, objects), "-o", str(partial)]]:
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:2000]}")
            os.replace(partial, target)     # whole or absent, with several workers building at once
        finally:
            partial.unlink(missing_ok=True)
            for o in objects:
                o.unlink(missing_ok=True)
        log.info("built the engine's kernels: %s", target)
    lib = ctypes.CDLL(str(target))
    for name in ("llmos_paged_attention_bf16", "llmos_paged_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _I64, _I64]
        fn.restype = ctypes.c_int
    for kind in ("bf16", "f32"):
        for name, argtypes in ((f"llmos_add_rms_norm_{kind}", [_P, _P, _P, _P, _I64, _I64, _F32]),
                               (f"llmos_rotary_store_{kind}",
                                [_P, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64]),
                               (f"llmos_silu_mul_{kind}", [_P, _P, _I64, _I64])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    lib.llmos_pair_product_bf16.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _P, _I64]
    lib.llmos_pair_product_bf16.restype = ctypes.c_int
    lib.llmos_pair_product_kind_bf16.argtypes = [_I64]
    lib.llmos_pair_product_kind_bf16.restype = ctypes.c_int
    for name in ("llmos_greedy_picks_f32", "llmos_greedy_picks_bf16"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [_P, _I64, _P, _I64, _I64, _P], None
    lib.llmos_llama_layers_bf16.argtypes = [_I64] * 7 + [_F32, _F32] + [_P] * 9 + [_P] * 8 + [_I64] + [_P] * 7 + [
        _I64, _I64]
    lib.llmos_llama_layers_bf16.restype = ctypes.c_int
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
                    window: int | None, rounded_from: int | None = None) -> torch.Tensor:
    """Attention of the query rows q [n, hq, d] over the pool `keys` [hk, pool, BLOCK, d] and `values`
    [hk, pool, BLOCK, dv]: row r reads the block table `tables[which[r]]` ([sequences, width], int64
    block ids) up to position `seen[r]` (int64, exclusive); returns [n, hq, dv] in q's dtype. bf16
    or float32, on the CPU. Rows from `rounded_from` on weigh the values as flash attention does in
    bf16 (each weight, not yet divided by their sum, rounded to bf16; the sum divides at the end)."""
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
          out.data_ptr(), n, hq, hk, d, dv, pool, tables.shape[1], scaling, softcap or 0.0, window or 0,
          n if rounded_from is None else rounded_from):
        raise ValueError(f"no attention kernel for {hq // hk} query heads a KV head of sizes {d} and {dv}")
    return out


_KINDS = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _kind(*tensors: torch.Tensor) -> str:
    """The kernels' name for the tensors' one dtype; raises for another dtype, mixed dtypes, a tensor
    off the CPU or not contiguous."""
    dtype = tensors[0].dtype
    kind = _KINDS.get(dtype)
    for t in tensors:               # (a loop, not a generator: these run some hundred times a step)
        if kind is None or t.dtype != dtype or t.is_cuda or not t.is_contiguous():
            raise ValueError("the fused kernels take contiguous CPU tensors of one dtype, bf16 or float32")
    return kind


def add_rms_norm(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] += add (in place, when given); returns weight * x / rms(x), the norm in float32,
    rounded as torch's operators round."""
    kind = _kind(x, weight, *(() if add is None else (add,)))
    rows, hidden = x.shape
    if weight.shape != (hidden,) or (add is not None and add.shape != x.shape):
        raise ValueError("add_rms_norm: shapes do not match")
    out = torch.empty_like(x)
    getattr(library(), f"llmos_add_rms_norm_{kind}")(
        x.data_ptr(), None if add is None else add.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, hidden, eps)
    return out


def rotary_store(qkv: torch.Tensor, hq: int, hk: int, d: int, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """The rotary embedding (halves rotated) of each row of qkv [rows, >= (hq + hk) * d + hk * dv] (rows may
    be apart, each contiguous: hq query heads, hk key heads of size d, then hk value heads) at `positions`
    [rows] (int64), from the tables cos and sin [positions, d]. The keys, rotated, and the values go into
    the cache `keys` [hk, blocks, BLOCK, d] and `values` [hk, blocks, BLOCK, dv] at each row's slot
    (`slots` [rows], int64: block * BLOCK + offset); returns the rotated queries [rows, hq, d]."""
    rows = qkv.shape[0]
    dv = values.shape[-1]
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] < (hq + hk) * d + hk * dv or d % 2:
        raise ValueError("rotary_store: qkv must be [rows, at least (hq + hk) * d + hk * dv] with contiguous rows, "
                         "d even")
    kind = _kind(cos, sin, keys, values)
    if qkv.dtype != cos.dtype or cos.shape[1] != d or keys.shape[-1] != d or keys.shape[0] != hk \
            or values.shape[:3] != keys.shape[:3]:
        raise ValueError("rotary_store: dtypes or shapes do not match")
    for index in (positions, slots):
        if index.dtype != torch.long or not index.is_contiguous() or index.shape != (rows,):
            raise ValueError("rotary_store: positions and slots must be int64 [rows]")
    out = qkv.new_empty(rows, hq, d)
    getattr(library(), f"llmos_rotary_store_{kind}")(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), slots.data_ptr(),
        out.data_ptr(), keys.data_ptr(), values.data_ptr(), rows, hq, hk, d, dv, keys.shape[1] * keys.shape[2])
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [rows, 2 * inner] (gate its first half); returns [rows, inner]."""
    kind = _kind(gate_up)
    rows, both = gate_up.shape
    out = gate_up.new_empty(rows, both // 2)
    getattr(library(), f"llmos_silu_mul_{kind}")(gate_up.data_ptr(), out.data_ptr(), rows, both // 2)
    return out


def built() -> bool:
    """Whether the kernels are already built and loaded in this process (without building them)."""
    return library.cache_info().currsize > 0


PICKED_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def greedy_picks(logits: torch.Tensor, rows: list[int]) -> list[int]:
    """torch.argmax of each of `rows` of the float32 or bf16 [n, vocab] CPU `logits` (rows contiguous), as ints."""
    kind = PICKED_DTYPES.get(logits.dtype)
    if kind is None or logits.dim() != 2 or logits.stride(1) != 1 or logits.is_cuda:
        raise ValueError("greedy_picks: logits must be float32 or bf16 [n, vocab] with contiguous rows on the CPU")
    if any(not 0 <= row < logits.shape[0] for row in rows):
        raise ValueError("greedy_picks: a row past the logits")
    which = torch.tensor(rows, dtype=torch.int64)
    out = torch.empty(len(rows), dtype=torch.int64)
    getattr(library(), f"llmos_greedy_picks_{kind}")(logits.data_ptr(), logits.stride(0), which.data_ptr(), len(rows),
                                                      logits.shape[1], out.data_ptr())
    return out.tolist()


def pair_product_kind(k: int) -> str:
    """Which kernel `pair_product` multiplies a weight of K `k` with: "amx" (AMX's tiles: a CPU with AMX and
    K a multiple of 32), "avx512_bf16" (oneDNN's prepacked bits), or "" (built without avx512_bf16)."""
    return {2: "amx", 1: "avx512_bf16"}.get(library().llmos_pair_product_kind_bf16(k), "")


def pair_product(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """x [rows, K] (bf16, rows contiguous) times a weight [N, K] stored in pairs, `pairs` [N / 16, K / 2, 16, 2]
    (`matmul.PairedWeight`): [rows, N] in bf16, each row's result its own whatever the rows: with AMX's tiles
    (`pair_product_kind`), else as oneDNN's prepacked kernel gives it on a CPU with avx512_bf16. Raises where
    the kernel was built without avx512_bf16."""
    rows, k = x.shape
    n = pairs.shape[0] * 16
    if x.dtype != torch.bfloat16 or x.stride(1) != 1 or x.is_cuda or pairs.shape[1:] != (k // 2, 16, 2) or k % 2:
        raise ValueError("pair_product: x must be bf16 [rows, K] with contiguous rows on the CPU, and the weight "
                         "[N / 16, K / 2, 16, 2]")
    out = x.new_empty(rows, n)
    if rows and library().llmos_pair_product_bf16(x.data_ptr(), rows, x.stride(0), pairs.data_ptr(), n, k,
                                                  out.data_ptr(), n):
        raise ValueError("pair_product: the kernels were built for a CPU without avx512_bf16")
    return out


def pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a C array (the tensors must outlive its use)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


@dataclass(frozen=True)
class StackWeights:
    """A Llama-family model's layer weights and paged cache as `llama_layers` reads them: each kind's
    pointers a layer, made once at load (the runner keeps the tensors for its life)."""

    ln1: ctypes.Array
    wqkv: ctypes.Array
    wo: ctypes.Array
    ln2: ctypes.Array
    w_gate_up: ctypes.Array
    w_down: ctypes.Array
    keys: ctypes.Array
    values: ctypes.Array
    pool: int           # blocks in the cache's pool
    inner: int


def llama_layers(x: torch.Tensor, weights: StackWeights, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, slots: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 rounded_from: int, hq: int, hk: int, d: int, eps: float) -> torch.Tensor:
    """Every layer of a Llama-family model over the step's hidden states x [T, hidden] (bf16, added to in
    place), in one call (`layer_stack.cpp`): what the runner's loop computes through `add_rms_norm`,
    `pair_product`, `rotary_store`, `paged_attention` (every row; rows from `rounded_from` weighed as
    flash attention weighs them) and `silu_mul`. `rows`: the step's block tables, each row's table and
    the positions each row sees the end of (`Step.rows`); the cache's keys and values are in `weights`.
    Returns the last layer's down product, not yet added to x."""
    total, hidden = x.shape
    inner = weights.inner
    new = x.new_empty
    h, o, pending = new(total, hidden), new(total, hidden), new(total, hidden)
    qkv, q, attended = new(total, (hq + 2 * hk) * d), new(total, hq, d), new(total, hq * d)
    gate_up, act = new(total, 2 * inner), new(total, inner)
    tables, which, seen = rows
    code = library().llmos_llama_layers_bf16(
        len(weights.keys), total, hidden, hq, hk, d, inner, eps, d ** -0.5, x.data_ptr(), h.data_ptr(),
        qkv.data_ptr(), q.data_ptr(), attended.data_ptr(), o.data_ptr(), gate_up.data_ptr(), act.data_ptr(),
        pending.data_ptr(),
        weights.ln1, weights.wqkv, weights.wo, weights.ln2, weights.w_gate_up, weights.w_down, weights.keys,
        weights.values, weights.pool, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), slots.data_ptr(),
        tables.data_ptr(), which.data_ptr(), seen.data_ptr(), tables.shape[1], rounded_from)
    if code:
        raise ValueError(f"the layer stack's kernels failed (code {code})")
    return pending
