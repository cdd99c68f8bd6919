"""What the decode kernel gives one engine: the same model and requests with decode attention through
the engine's C++ kernel (it reads the block tables in place, `engine/paged_attention.cpp`) and without, in alternating
rounds in one process, with the worker's defaults otherwise.

    python -m benchmarks.compiled [--source bundled:smollm2-135m-instruct | tiny | DIR] [--rounds 2]
                                  [--concurrency 1 16 32 64] [--tokens 64] [--dtype auto]
                                  [--baseline eager | tiles]

`--baseline eager` (the default): the same engine uncompiled. `--baseline tiles`: uncompiled, and
bf16 weights as stored multiplied in tiles of 16 rows (what every CPU with native bf16 did before
its weights were prepacked; with AMX they still go in tiles). Printed: tokens per second, time to
first token and the gap between tokens for both (medians over the rounds) and their ratio. The
compiled engine builds its kernel at load (or finds it built in TORCHINDUCTOR_CACHE_DIR/llmos-kernels).
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

from benchmarks.paged import compare, engine_arguments, header, setting_up
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS
from llmos.engine import Engine, matmul
from llmos.engine.loader import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine_arguments(parser)
    parser.add_argument("--baseline", choices=["eager", "tiles"], default="eager",
                        help="uncompiled; 'tiles': bf16 weights as stored, in tiles of 16 rows too")
    args = parser.parse_args()

    with setting_up(args, "llmos-bench-compiled-") as (directory, device, dtype, driver, engines):
        tiles = args.baseline == "tiles"
        eager = "eager, weights as stored in tiles of 16" if tiles else "eager"
        for label, compile in (("compiled", True), (eager, False)):
            as_before = tiles and not compile
            with mock.patch.multiple(matmul, cpu_kind=lambda: "amx", packs_bf16=lambda: False) if as_before \
                    else contextlib.nullcontext():
                loaded = driver.call(load_model, label, str(directory), device, dtype, DEFAULT_KV_CACHE_TOKENS,
                                     4096, "", "auto", compile).result()
            print(f"{label}: decode attention {'compiled' if loaded.compiled else 'as batched products'}", flush=True)
            engines[label] = Engine(label, loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefix_cache=False)
        header(args, device, dtype)
        compare(engines, loaded.tokenizer, args.concurrency, args.rounds, args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
