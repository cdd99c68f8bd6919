"""What the engine's own bf16 product kernel gives a step on a CPU with avx512_bf16 (vdpbf16ps) or AMX (AMX's
tiles): the same runner's forward with its weights prepacked for oneDNN (`PackedWeight`, as before: whole with
avx512_bf16 alone, in tiles of 16 rows with AMX), in pairs (`PairedWeight`, `pair_products.cpp`), and in pairs
with the layers in one native call (`layer_stack.cpp`), in alternating rounds in one process.

    python -m benchmarks.products [--source bundled:smollm2-135m-instruct | tiny | DIR] [--rounds 3]
                                  [--rows 1 16 32 64] [--prompt 256] [--positions 80]

Each round times 10 forward steps of each kind: decode steps of R sequences holding `--positions`
positions, and a prompt chunk of `--prompt` tokens. Printed: the fastest round of each (ms a step),
the speed-ups over oneDNN, and whether the kinds gave the same logits bit for bit (all three must with
avx512_bf16 alone; with AMX the tiles sum in another order than oneDNN, and the two pair kinds must agree).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.fused import forward_cases
from benchmarks.lora import model_directory
from llmos.common.devices import cpu_kind
from llmos.engine.attention import Step
from llmos.engine.loader import load_model, pick_device
from llmos.engine.matmul import PACKED_BF16_MIN_ROWS, ROW_TILE, PackedWeight, PairedWeight

NAMES = ("wqkv", "wo", "w_gate_up", "w_down")


def unpaired(weight: PairedWeight) -> torch.Tensor:
    """The [out, in] matrix a PairedWeight holds."""
    blocks, half, _, _ = weight.pairs.shape
    return weight.pairs.permute(0, 2, 1, 3).reshape(blocks * 16, half * 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--conversion-cache", default="", help="the registry's conversion cache directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--positions", type=int, default=80)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmos-bench-products-") as scratch:
        directory = model_directory(args.source, Path(scratch), args.conversion_cache)
        device = pick_device("auto")
        runner = load_model("m", str(directory), device, torch.bfloat16, 65536, 4096, compile=True).runner
        weights = [(layer, name) for layer in runner.layers for name in NAMES] + [(runner, "lm_head")]
        paired = [getattr(owner, name) for owner, name in weights]
        if not all(isinstance(w, PairedWeight) for w in paired):
            print(f"this CPU ({cpu_kind()}) does not multiply this model's weights in pairs; nothing to compare")
            return 1
        amx = cpu_kind() == "amx"
        packed = [PackedWeight.of(unpaired(w), ROW_TILE if amx else None, PACKED_BF16_MIN_ROWS) for w in paired]

        def use(kinds: list) -> None:
            for (owner, name), weight in zip(weights, kinds, strict=True):
                setattr(owner, name, weight)

        print(f"{args.source} in bfloat16 on {device} ({cpu_kind()}); fastest of {args.rounds} alternating rounds "
              "of 10 steps", flush=True)
        stack = runner.stack
        # Each kind: the weights, and whether the layers run in one call (`native.llama_layers`).
        kinds = {"oneDNN": (packed, None), "pairs": (paired, None), "pairs, one call": (paired, stack)}
        for label, parts, tokens, rows in forward_cases(args.rows, args.positions, args.prompt, device):
            best = dict.fromkeys(kinds, float("inf"))
            outputs = {}
            for _ in range(args.rounds):
                for kind, (chosen, layers) in kinds.items():
                    use(chosen)
                    runner.stack = layers
                    for _ in range(2):
                        outputs[kind] = runner.forward(tokens, Step(parts, device), rows)
                    started = time.perf_counter()
                    for _ in range(10):
                        runner.forward(tokens, Step(parts, device), rows)
                    best[kind] = min(best[kind], (time.perf_counter() - started) / 10 * 1e3)
            use(paired)
            runner.stack = stack
            same = all(torch.equal(outputs[kind], outputs["pairs"]) for kind in kinds if kind != "oneDNN" or not amx)
            print(f"{label:<26} oneDNN {best['oneDNN']:7.2f} ms  pairs {best['pairs']:7.2f} ms "
                  f"({best['oneDNN'] / best['pairs']:.2f}x)  pairs in one call {best['pairs, one call']:7.2f} ms "
                  f"({best['oneDNN'] / best['pairs, one call']:.2f}x)  same logits: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
