"""What the paged KV cache gives one engine: the same model and requests with the worker's defaults
(a pool of `DEFAULT_KV_CACHE_TOKENS` positions, up to 256 sequences running) against the capacity
the slot cache had (16 sequences, 16 x 2,048 positions), in alternating rounds in one process.

    python -m benchmarks.paged [--source bundled:smollm2-135m-instruct | tiny | DIR] [--rounds 2]
                               [--concurrency 16 32 64] [--tokens 64] [--long 64] [--dtype auto]

Each round submits C chat requests at once (every one generates exactly `--tokens` tokens; the
prefix cache is off, so no round reuses another's prompts) and measures tokens per second over the
round, time to first token and the gap between tokens. `--long N` adds N requests of 2,000 prompt
tokens and 64 new ones: how many hold cache blocks and run at once (they are cancelled then).
Printed: each figure for both configurations (medians over the rounds) and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.lora import PROMPTS, model_directory
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS, SamplingParams
from llmos.engine import Engine, EngineDriver, Sequence
from llmos.engine.loader import load_model, pick_device, pick_dtype

SLOT_CACHE = (16, 16 * 2048)          # what the slot cache held: 16 sequences of 2,048 positions


class Timing:
    """One request's chunks as they come."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()
        self.error = None

    def __call__(self, item) -> None:
        if isinstance(item, Exception):
            self.error = item
            self.done.set()
            return
        self.times.append(time.perf_counter())
        if item.finish_reason is not None:
            self.done.set()


def admitted(engine: Engine, prompts: list[list[int]]) -> int:
    """Submits the prompts (64 new tokens each), counts how many join the batch within the first
    seconds (the waiting line's head joins as soon as the cache has blocks for it), then cancels all."""
    seqs = [Sequence(f"long{i}", ids, SamplingParams(ignore_eos=True), 64, Timing()) for i, ids in enumerate(prompts)]
    for seq in seqs:
        engine.submit(seq)
    most, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline:
        most = max(most, engine.stats().running)
        time.sleep(0.05)
    for seq in seqs:
        engine.cancel(seq)
    while engine.stats().running or engine.stats().waiting:
        time.sleep(0.05)
    return most


def one_round(engine: Engine, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    timings = [Timing() for _ in prompts]
    started = time.perf_counter()
    for i, (ids, timing) in enumerate(zip(prompts, timings, strict=True)):
        engine.submit(Sequence(f"r{i}", ids, SamplingParams(ignore_eos=True), tokens, timing))
    for timing in timings:
        timing.done.wait()
        if timing.error is not None:
            raise timing.error
    wall = time.perf_counter() - started
    gaps = [b - a for t in timings for a, b in zip(t.times, t.times[1:], strict=False)]
    return {"tok/s": sum(len(t.times) for t in timings) / wall,
            "TTFT p50 ms": statistics.median(t.times[0] - started for t in timings) * 1e3,
            "ITL p50 ms": statistics.median(gaps) * 1e3, "wall s": wall}


def report(name: str, labels: list[str], figures: dict[str, list[dict[str, float]]]) -> None:
    for key in figures[labels[0]][0]:
        values = [statistics.median(f[key] for f in figures[label]) for label in labels]
        ratio = values[0] / values[1] if values[1] else float("nan")
        cells = "  ".join(f"{label}: {v:8.1f}" for label, v in zip(labels, values, strict=True))
        print(f"{name:<18} {key:<13} {cells}"
              + f"  ratio {ratio:.2f}x", flush=True)


def compare(engines: dict[str, Engine], tok, concurrency: list[int], rounds: int, tokens: int) -> None:
    """For each C: C chat requests to each engine, warmed at that C once, then `rounds` alternating
    rounds; prints each figure's medians and their ratio (the first engine over the second)."""
    labels = list(engines)
    for c in concurrency:
        prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
                   for i in range(c)]
        for engine in engines.values():
            one_round(engine, prompts, 8)                  # warm: this batch size once
        figures: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
        for r in range(rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                figures[label].append(one_round(engines[label], prompts, tokens))
        report(f"C={c}", labels, figures)


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark comparing engines in one process (`setting_up`, `compare`)."""
    parser.add_argument("--source", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--conversion-cache", default="", help="the registry's conversion cache directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")


@contextlib.contextmanager
def setting_up(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, torch.device, torch.dtype, EngineDriver,
                                                                        dict[str, Engine]]]:
    """The model directory `args.source` names, the device, the dtype, a running engine driver and a
    dict for the engines to compare: those are stopped at the end, then the driver."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        directory = model_directory(args.source, Path(scratch), args.conversion_cache)
        device = pick_device("auto")
        dtype = pick_dtype(args.dtype, device)
        driver = EngineDriver()
        driver.start_thread()
        engines: dict[str, Engine] = {}
        try:
            yield directory, device, dtype, driver, engines
        finally:
            for engine in engines.values():
                engine.stop()
            driver.stop()


def header(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    print(f"{args.source} in {str(dtype).removeprefix('torch.')} on {device}; {args.tokens} tokens a request; "
          f"medians of {args.rounds} alternating rounds", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine_arguments(parser)
    parser.add_argument("--long", type=int, default=0, help="requests of 2,000 prompt tokens (0: none)")
    args = parser.parse_args()

    with setting_up(args, "llmos-bench-paged-") as (directory, device, dtype, driver, engines):
        for label, (running, kv_tokens) in {"paged default": (256, DEFAULT_KV_CACHE_TOKENS),
                                            "16 x 2,048 (the slot cache's capacity)": SLOT_CACHE}.items():
            loaded = driver.call(load_model, label, str(directory), device, dtype, kv_tokens, 4096).result()
            engines[label] = Engine(label, loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefix_cache=False,
                                    max_running=running)
        tok = loaded.tokenizer
        header(args, device, dtype)
        compare(engines, tok, args.concurrency, args.rounds, args.tokens)
        if args.long and loaded.max_seq_len < 2000 + 64:
            print(f"--long: {args.source} holds {loaded.max_seq_len} positions, fewer than 2,000 + 64", flush=True)
        elif args.long:
            words = tok("river " * 2100)["input_ids"]
            long = [[*tok(f"{i}:")["input_ids"], *words][:2000] for i in range(args.long)]
            for label, engine in engines.items():
                print(f"{args.long} x 2,000-token prompts, 64 new tokens: {admitted(engine, long)} of them "
                      f"running at once with {label}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
