"""One decode step of the lean forward on a GPU, three ways, in one process: torch's operators
(compile off), the engine's Triton kernels launched one by one, and the same kernels replayed as a CUDA
graph; at several batch sizes, every sequence holding CONTEXT positions. Prints ms a step, the ratios,
and the kernels one step launches (torch's profiler). Usage: python step_bench.py MODEL_DIR [CONTEXT]"""

from __future__ import annotations

import sys
import time

import torch

from llmos.engine.attention import BLOCK, Part, Step, blocks_for
from llmos.engine.loader import load_model

BATCHES = (1, 16, 64, 256)


def timed(runner, n: int, context: int, repeats: int = 30) -> float:
    """ms a decode step of n rows, each at position `context` over its own blocks."""
    held = blocks_for(context + 1)
    parts = [Part(list(range(1 + i * held, 1 + (i + 1) * held)), context, 1, decode=True) for i in range(n)]
    tokens = torch.randint(0, runner.vocab_size, (n,), device=runner.device)
    rows = torch.arange(n, device=runner.device)
    for _ in range(3):
        runner.forward(tokens, Step(parts, runner.device), rows).argmax(-1).tolist()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        runner.forward(tokens, Step(parts, runner.device), rows).argmax(-1).tolist()
    return (time.perf_counter() - started) / repeats * 1e3


def kernels(runner, n: int, context: int) -> int:
    from torch.profiler import ProfilerActivity, profile
    held = blocks_for(context + 1)
    parts = [Part(list(range(1 + i * held, 1 + (i + 1) * held)), context, 1, decode=True) for i in range(n)]
    tokens = torch.zeros(n, dtype=torch.long, device=runner.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(tokens, Step(parts, runner.device), torch.arange(n, device=runner.device))
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> int:
    path, context = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128
    kv = (max(BATCHES) * blocks_for(context + 1) + 1) * BLOCK
    ways = {}
    for name, compile, graphs in (("torch ops", False, 0), ("kernels", True, 0), ("CUDA graphs", True, max(BATCHES))):
        started = time.monotonic()
        loaded = load_model("m", path, torch.device("cuda"), torch.bfloat16, kv, 2048, compile=compile, graphs=graphs)
        print(f"{name}: loaded in {time.monotonic() - started:.1f}s, graphs {loaded.runner.graphs is not None}",
              flush=True)
        ways[name] = {n: timed(loaded.runner, n, context) for n in BATCHES}
        if name != "CUDA graphs":
            print(f"  kernels launched by one step of 1 row: {kernels(loaded.runner, 1, context)}", flush=True)
        del loaded
        torch.cuda.empty_cache()
    print(f"decode step, ms, {context} positions held each ({torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__})")
    for n in BATCHES:
        base = ways["torch ops"][n]
        print(f"  batch {n:4}: " + ", ".join(f"{k} {v[n]:.2f}" for k, v in ways.items())
              + f"; torch ops / graphs {base / ways['CUDA graphs'][n]:.1f}x, "
              f"{n / ways['CUDA graphs'][n] * 1e3:.0f} tok/s a step of graphs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
