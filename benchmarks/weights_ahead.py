"""What the AMX products gain from asking for the next column group's weights while one group is multiplied
(`pair_products.cpp`, above 16 rows) against the kernels of another tree, where the CPU's own prefetcher alone
kept ahead of them: both builds loaded in one process, timed in alternating rounds. On a CPU with AMX only.

    git worktree add /tmp/before <commit>      # a tree whose products do not ask ahead
    python -m benchmarks.weights_ahead --baseline /tmp/before/services/llmos/engine
                                       [--source bundled:smollm2-135m-instruct] [--rounds 5]
                                       [--rows 1 16 32 64 128 256] [--chats 16 64]

Printed: the products of one SmolLM2 step alone (30 layers' four weights and the LM head, 270 MB of bf16 in
pairs, random values, each weight read once a step as in the engine; ms a step) for each `--rows`, with whether
the two builds' outputs are the same bits; then C chat requests of 64 new tokens at once through one engine for
each `--chats`, `--rounds` rounds of each build: tokens a second, time to first token, the gap between tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.chunk_attention import parser, report, through_one_engine, timed, two_builds
from benchmarks.lora import PROMPTS, model_directory
from llmos.engine import native
from llmos.engine.loader import load_model, pick_device
from llmos.engine.matmul import PairedWeight

BEFORE, AFTER = "as read", "asked ahead"
# SmolLM2-135M's products, [out, in]: QKV, the output, gate and up, down; then the LM head.
LAYER = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS, HEAD = 30, (49152, 576)


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256])
    arguments.add_argument("--chats", type=int, nargs="+", default=[16, 64])
    args = arguments.parse_args()
    if native.pair_product_kind(576) != "amx":
        print("this CPU multiplies without AMX's tiles: nothing to compare")
        return 0
    with two_builds(args.baseline, (BEFORE, AFTER), args.rounds) as libraries:
        generator = torch.Generator().manual_seed(0)
        weights = [PairedWeight.of((torch.randn(n, k, generator=generator) * 0.05).bfloat16()).pairs
                   for n, k in (*LAYER * LAYERS, HEAD)]
        print("the products of one step alone (every weight read once):")
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, generator=generator).bfloat16() for k in {k for _, k in LAYER}}
            outputs: dict[str, torch.Tensor] = {}

            def run(name: str, inputs=inputs, outputs=outputs) -> None:
                native.library = lambda name=name: libraries[name]
                for pairs in weights:
                    outputs[name] = native.pair_product(inputs[pairs.shape[1] * 2], pairs)

            best = timed(run, args.rounds, 3, names=(BEFORE, AFTER))
            a, b = outputs.values()
            report(f"{rows} rows", best, 0.0 if torch.equal(a.view(torch.int16), b.view(torch.int16))
                   else (a.float() - b.float()).abs().max().item())
        with tempfile.TemporaryDirectory(prefix="llmos-bench-ahead-") as scratch:
            directory = model_directory(args.source, Path(scratch), args.conversion_cache)
            loaded = load_model("m", str(directory), pick_device("auto"), torch.bfloat16, 160_000, 4096, compile=True)
            tok = loaded.tokenizer
            for c in args.chats:
                prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
                           for i in range(c)]
                print(f"C={c} chats of 64 new tokens at once, one engine, {args.rounds} rounds of each build:")
                through_one_engine(loaded, prompts, libraries, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
