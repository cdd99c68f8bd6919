"""One decode step of the lean forward on a GPU, three ways, in one process: torch's operators
(compile off), the engine's Triton kernels launched one by one, and the same kernels replayed as a CUDA
graph; at several batch sizes, every sequence holding CONTEXT positions. Prints ms a step, the share of
it the GPU is busy, the ratios, and the kernels one eager step launches (torch's profiler).
Usage: python step_bench.py MODEL_DIR [CONTEXT]"""

from __future__ import annotations

import sys
import time

import torch

from llmos.engine.attention import BLOCK, Part, Step, blocks_for
from llmos.engine.loader import load_model

BATCHES = (1, 16, 64, 256)


def timed(runner, n: int, context: int, repeats: int = 30) -> tuple[float, float]:
    """ms a decode step of n rows takes (each row at position `context` over its own blocks, its greedy
    picks read back as the engine reads them), and the share of that time the GPU was busy (CUDA events
    around each step's work on the device, summed, over the wall time)."""
    held = blocks_for(context + 1)
    parts = [Part(list(range(1 + i * held, 1 + (i + 1) * held)), context, 1, decode=True) for i in range(n)]
    tokens = torch.randint(0, runner.vocab_size, (n,), device=runner.device)
    rows = torch.arange(n, device=runner.device)
    for _ in range(3):
        runner.forward(tokens, Step(parts, runner.device), rows).argmax(-1).tolist()
    torch.cuda.synchronize()
    busy = 0.0
    started = time.perf_counter()
    for _ in range(repeats):
        step = Step(parts, runner.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        logits = runner.forward(tokens, step, rows)
        end.record()
        logits.argmax(-1).tolist()
        busy += begin.elapsed_time(end)
    wall = (time.perf_counter() - started) / repeats * 1e3
    return wall, busy / repeats / wall


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
        for n, (wall, busy) in ways[name].items():
            print(f"    batch {n}: {wall:.2f} ms a step, the GPU busy {busy:.0%} of it", flush=True)
        if name != "CUDA graphs":
            print(f"  kernels launched by one step of 1 row: {kernels(loaded.runner, 1, context)}", flush=True)
        del loaded
        torch.cuda.empty_cache()
    print(f"decode step, ms, {context} positions held each ({torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__})")
    for n in BATCHES:
        base, graphed = ways["torch ops"][n][0], ways["CUDA graphs"][n][0]
        print(f"  batch {n:4}: " + ", ".join(f"{k} {v[n][0]:.2f} (GPU busy {v[n][1]:.0%})" for k, v in ways.items())
              + f"; torch ops / graphs {base / graphed:.1f}x, {n / graphed * 1e3:.0f} tok/s a step of graphs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
