"""What flash attention gives prompts: the same engine with its prompt chunks through torch's flash
attention (`PagedCache.flash_prompts`, the default in half precision on the CPU) and through the batched
float32 products, in alternating rounds in one process.

    python -m benchmarks.prefill [--source bundled:smollm2-135m-instruct | tiny | DIR] [--rounds 3]
                                 [--lengths 118 1008 2000] [--concurrency 16] [--dtype auto]

For each prompt length: the time from submitting one prompt (one new token) to its token, medians over
the rounds. Then `compare`'s chat rounds at each `--concurrency` (tokens per second, time to first
token). Printed: each figure for both and their ratio.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.paged import Timing, compare, engine_arguments, header, report, setting_up
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS, SamplingParams
from llmos.engine import Engine, Sequence
from llmos.engine.loader import load_model

TEXT = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def prefill_ms(engine: Engine, ids: list[int], name: str) -> float:
    timing = Timing()
    started = time.perf_counter()
    engine.submit(Sequence(name, ids, SamplingParams(ignore_eos=True), 1, timing))
    timing.done.wait()
    if timing.error is not None:
        raise timing.error
    return (timing.times[0] - started) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[118, 1008, 2000])
    parser.set_defaults(rounds=3, concurrency=[16])
    args = parser.parse_args()

    with setting_up(args, "llmos-bench-prefill-") as (directory, device, dtype, driver, engines):
        for label, flash in (("flash", True), ("products", False)):
            loaded = driver.call(load_model, label, str(directory), device, dtype, DEFAULT_KV_CACHE_TOKENS,
                                 4096, "", "auto", True).result()
            loaded.runner.cache.flash_prompts = flash and loaded.runner.cache.flash_prompts
            print(f"{label}: prompts through flash attention: {loaded.runner.cache.flash_prompts}", flush=True)
            engines[label] = Engine(label, loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefix_cache=False)
        header(args, device, dtype)
        tok, labels = loaded.tokenizer, list(engines)
        text = tok(TEXT * (max(args.lengths) // 10 + 1), add_special_tokens=False)["input_ids"]
        for length in args.lengths:
            for label in labels:
                prefill_ms(engines[label], text[:length], f"warm-{length}")
            figures: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
            for r in range(args.rounds):
                for label in labels if r % 2 == 0 else labels[::-1]:
                    figures[label].append({"prefill ms": prefill_ms(engines[label], text[:length], f"p{r}-{length}")})
            report(f"{length} tokens", labels, figures)
        compare(engines, tok, args.concurrency, args.rounds, args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
