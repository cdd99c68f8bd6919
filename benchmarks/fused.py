"""What the fused kernels give a step: the same runner's forward with the element-wise work of each layer
(residual add with RMS norm, rotary embedding, SiLU times up) through the engine's fused kernels and
through torch's operators, in alternating rounds in one process.

    python -m benchmarks.fused [--source bundled:smollm2-135m-instruct | tiny | DIR] [--rounds 3]
                               [--rows 1 16 64] [--prompt 256] [--positions 80] [--dtype auto]

Each round times 10 forward steps of each kind: decode steps of R sequences holding `--positions`
positions, and a prompt chunk of `--prompt` tokens. Printed: the fastest round of each (ms a step) and
their ratio, fused over unfused.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lora import model_directory
from llmos.engine.attention import Part, Step, blocks_for
from llmos.engine.loader import load_model, pick_device, pick_dtype


def forward_cases(row_counts: list[int], positions: int, prompt: int, device: torch.device,
                  ) -> list[tuple[str, list[Part], torch.Tensor, torch.Tensor]]:
    """The steps these benchmarks time: decode steps of R sequences holding `positions` positions
    each, and one prompt chunk of `prompt` tokens; each with its token ids and the rows whose logits
    it returns."""
    cases = []
    for count in row_counts:
        per = blocks_for(positions + 1)
        cases.append((f"decode, {count} rows", [Part(list(range(1 + i * per, 1 + (i + 1) * per)), positions, 1, True)
                                                for i in range(count)], count))
    cases.append((f"a prompt chunk of {prompt}", [Part(list(range(1, blocks_for(prompt) + 1)), 0, prompt)], 1))
    steps = []
    for label, parts, logits in cases:
        total = sum(p.length for p in parts)
        steps.append((label, parts, torch.randint(100, 1000, (total,), device=device),
                      torch.arange(total - logits, total, device=device)))
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--conversion-cache", default="", help="the registry's conversion cache directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--positions", type=int, default=80)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmos-bench-fused-") as scratch:
        directory = model_directory(args.source, Path(scratch), args.conversion_cache)
        device = pick_device("auto")
        dtype = pick_dtype(args.dtype, device)
        runner = load_model("m", str(directory), device, dtype, 65536, 4096, compile=True).runner
        if not runner.fused:
            print("no fused kernels here (they need a C++ compiler and a CPU); nothing to compare")
            return 1
        print(f"{args.source} in {str(dtype).removeprefix('torch.')} on {device}; fastest of {args.rounds} "
              f"alternating rounds of 10 steps", flush=True)
        for label, parts, tokens, rows in forward_cases(args.rows, args.positions, args.prompt, device):
            best = {True: float("inf"), False: float("inf")}
            for _ in range(args.rounds):
                for fused in (True, False):
                    runner.fused = fused
                    for _ in range(2):
                        runner.forward(tokens, Step(parts, device), rows)
                    started = time.perf_counter()
                    for _ in range(10):
                        runner.forward(tokens, Step(parts, device), rows)
                    best[fused] = min(best[fused], (time.perf_counter() - started) / 10 * 1e3)
            print(f"{label:<26} fused {best[True]:7.2f} ms  unfused {best[False]:7.2f} ms  "
                  f"ratio {best[True] / best[False]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
