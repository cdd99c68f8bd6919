"""What decoding rows gain from their scores taken a block of keys at a time (`paged_attention.cpp`'s
`score_turned`, where the CPU has AVX-512 and the cache is bf16) against the kernels of another tree, where
each score converted its key and summed across a vector: both builds loaded in one process, timed in
alternating rounds.

    git worktree add /tmp/before <commit>      # a tree whose decoding rows score one key at a time
    python -m benchmarks.decode_attention --baseline /tmp/before/services/llmos/engine
                                          [--source bundled:smollm2-135m-instruct] [--rounds 5] [--long 16]

Printed: SmolLM2's attention alone (9 query heads, 3 KV heads of 64; ms a layer) for decoding steps of 16 and
64 rows that see 100, 500 and 2,000 positions each, with the largest difference between the two builds'
outputs; with `--long N`, N concurrent requests of 2,000 prompt tokens and 64 new tokens through one engine
(no prefix cache), two rounds of each build: tokens a second, time to first token, the gap between tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.chunk_attention import attention_case, long_prompts, parser, report, timed, two_builds
from benchmarks.lora import model_directory
from llmos.engine import native
from llmos.engine.loader import load_model, pick_device

BEFORE, AFTER = "a key at a time", "a block at a time"


def main() -> int:
    args = parser(__doc__).parse_args()
    with two_builds(args.baseline, (BEFORE, AFTER), args.rounds) as libraries:
        print("attention alone, SmolLM2's heads, one layer, every row decoding:")
        generator = torch.Generator().manual_seed(0)
        for rows in (16, 64):
            for positions in (100, 500, 2000):
                q, keys, values, tables, which, seen = attention_case([(positions - 1, 1)] * rows, generator)
                outputs = {}

                def run(name: str, q=q, keys=keys, values=values, tables=tables, which=which, seen=seen,
                        outputs=outputs) -> None:
                    native.library = lambda name=name: libraries[name]
                    outputs[name] = native.paged_attention(q, keys, values, tables, which, seen, 0.125, None, None,
                                                           rounded_from=len(which))

                best = timed(run, args.rounds, max(3, 4000 // positions), names=(BEFORE, AFTER))
                a, b = outputs.values()
                report(f"{rows} rows of {positions} positions", best, (a.float() - b.float()).abs().max().item())
        if args.long:
            with tempfile.TemporaryDirectory(prefix="llmos-bench-decode-") as scratch:
                directory = model_directory(args.source, Path(scratch), args.conversion_cache)
                loaded = load_model("m", str(directory), pick_device("auto"), torch.bfloat16, 160_000, 4096,
                                    compile=True)
                long_prompts(loaded, args.long, libraries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
