"""What the attention kernel's prompt rows gain from sharing their work (`paged_attention.cpp`'s
`attend_chunk`: up to 16 consecutive rows of a bf16 prompt chunk read each block of keys and values once)
against the kernels of another tree, where each row reads them alone: both builds loaded in one process,
timed in alternating rounds.

    git worktree add /tmp/before <commit>      # a tree whose prompt rows go one at a time
    python -m benchmarks.chunk_attention --baseline /tmp/before/services/llmos/engine
                                         [--source bundled:smollm2-135m-instruct] [--rounds 5] [--lengths 256 2000]
                                         [--long 16]

Printed: SmolLM2's attention alone (9 query heads, 3 KV heads of 64; ms a layer) for a prompt chunk of 256
rows at the start and at the end of a 2,000-token prompt and for waves of short prompts after a cached
prefix; then the model's prefill of one prompt of each `--lengths` (chunks of 256 tokens, ms to its
logits). Each with the largest difference between the two builds' outputs. With `--long N`: N concurrent
requests of 2,000 prompt tokens and 64 new tokens through one engine (no prefix cache), two rounds of each
build: tokens a second, time to first token, the gap between tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.lora import model_directory
from benchmarks.paged import one_round
from llmos.common.devices import cpu_kind
from llmos.engine import Engine, native
from llmos.engine.attention import BLOCK, Part, Step, blocks_for
from llmos.engine.driver import EngineDriver
from llmos.engine.loader import LoadedModel, load_model, pick_device

HQ, HK, D = 9, 3, 64


def build(directory: Path):  # noqa: ANN201 - a ctypes.CDLL
    """The engine's kernels built from the sources in `directory` (with this tree's flags)."""
    saved = native.SOURCES, native.HEADERS
    native.SOURCES = tuple(directory / source.name for source in saved[0])
    native.HEADERS = tuple(directory / header.name for header in saved[1])
    try:
        return native.library.__wrapped__()
    finally:
        native.SOURCES, native.HEADERS = saved


def parser(doc: str) -> argparse.ArgumentParser:
    """The options both kernel comparisons take (a module's own come after)."""
    parsed = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parsed.add_argument("--baseline", required=True, help="the engine directory of a tree to compare with")
    parsed.add_argument("--source", default="bundled:smollm2-135m-instruct")
    parsed.add_argument("--conversion-cache", default="", help="the registry's conversion cache directory")
    parsed.add_argument("--rounds", type=int, default=5)
    parsed.add_argument("--long", type=int, default=0, help="concurrent requests of 2,000 prompt tokens (0: none)")
    return parsed


@contextlib.contextmanager
def two_builds(baseline: str, names: tuple[str, str], rounds: int) -> Iterator[dict]:
    """The kernels of the tree at `baseline` and this tree's, by `names` (the baseline's first), for the rounds to
    swap in as `native.library`; the engine's own library again after."""
    libraries = {names[0]: build(Path(baseline)), names[1]: native.library()}
    real_library, real_built = native.library, native.built
    native.built = lambda: True         # (it asks the cached library, which the rounds swap)
    print(f"CPU kind {cpu_kind()}; fastest of {rounds} alternating rounds", flush=True)
    try:
        yield libraries
    finally:
        native.library, native.built = real_library, real_built


def attention_case(parts: list[tuple[int, int]], generator: torch.Generator) -> tuple:
    """The kernel's operands for prompt chunks of (cached, new) positions, each sequence's blocks apart."""
    held = [blocks_for(cached + new) for cached, new in parts]
    pool = sum(held) + 1
    keys = torch.randn(HK, pool, BLOCK, D, generator=generator).bfloat16()
    values = torch.randn(HK, pool, BLOCK, D, generator=generator).bfloat16()
    width, first, tables, which, seen = max(held), 1, [], [], []
    for i, ((cached, new), h) in enumerate(zip(parts, held, strict=True)):
        tables.append(list(range(first, first + h)) + [0] * (width - h))
        first += h
        which += [i] * new
        seen += range(cached + 1, cached + new + 1)
    q = torch.randn(len(which), HQ, D, generator=generator).bfloat16()
    return q, keys, values, torch.tensor(tables), torch.tensor(which), torch.tensor(seen)


BEFORE, AFTER = "one row at a time", "rows together"


def timed(run, rounds: int, repeats: int, names: tuple[str, str] = (BEFORE, AFTER)) -> dict[str, float]:  # noqa: ANN001
    """The fastest of `rounds` alternating rounds of `repeats` calls of each build (`run(name)`), in ms a call."""
    best = dict.fromkeys(names, float("inf"))
    for _ in range(rounds):
        for name in best:
            started = time.perf_counter()
            for _ in range(repeats):
                run(name)
            best[name] = min(best[name], (time.perf_counter() - started) / repeats * 1e3)
    return best


def report(label: str, best: dict[str, float], difference: float) -> None:
    """One line: each build's time (the baseline's first) and the baseline's over the other's."""
    (first, before), (second, after) = best.items()
    print(f"  {label:<46} {first} {before:8.2f} ms  {second} {after:8.2f} ms  "
          f"({before / after:.2f}x)  max |difference| {difference:.3g}", flush=True)


def main() -> int:
    options = parser(__doc__)
    options.add_argument("--lengths", type=int, nargs="+", default=[256, 2000])
    args = options.parse_args()
    cases = {"a 256-row chunk at a prompt's start": [(0, 256)],
             "the last 256 rows of a 2,000-token prompt": [(1744, 256)],
             "16 prompts of 12 rows after 32 cached": [(32, 12)] * 16,
             "64 prompts of 4 rows after 32 cached": [(32, 4)] * 64}
    with two_builds(args.baseline, (BEFORE, AFTER), args.rounds) as libraries:
        print("attention alone, SmolLM2's heads, one layer:")
        generator = torch.Generator().manual_seed(0)
        for label, parts in cases.items():
            q, keys, values, tables, which, seen = attention_case(parts, generator)
            outputs = {}

            def run(name: str, q=q, keys=keys, values=values, tables=tables, which=which, seen=seen,
                    outputs=outputs) -> None:
                native.library = lambda name=name: libraries[name]
                outputs[name] = native.paged_attention(q, keys, values, tables, which, seen, 0.125, None, None,
                                                       rounded_from=0)

            best = timed(run, args.rounds, 20 if len(parts) > 1 or parts[0][0] == 0 else 3)
            a, b = outputs.values()
            report(label, best, (a.float() - b.float()).abs().max().item())

        with tempfile.TemporaryDirectory(prefix="llmos-bench-chunks-") as scratch:
            directory = model_directory(args.source, Path(scratch), args.conversion_cache)
            loaded = load_model("m", str(directory), pick_device("auto"), torch.bfloat16, 160_000, 4096,
                                compile=True)
            runner = loaded.runner
            print(f"{args.source} in bf16: one prompt's prefill in chunks of 256 tokens, to its last logits")
            for length in args.lengths:
                tokens = torch.randint(0, 1000, (length,), generator=generator)
                blocks = list(range(1, blocks_for(length) + 2))
                logits = {}

                def prefill(name: str, length=length, tokens=tokens, blocks=blocks, logits=logits) -> None:
                    native.library = lambda name=name: libraries[name]
                    for start in range(0, length, 256):
                        n = min(256, length - start)
                        out = runner.forward(tokens[start:start + n], Step([Part(blocks, start, n)], runner.device),
                                             torch.tensor([n - 1]))
                    logits[name] = out.float()

                best = timed(prefill, max(2, args.rounds // 2), 1)
                a, b = logits.values()
                report(f"a prompt of {length} tokens", best, (a - b).abs().max().item())
            if args.long:
                long_prompts(loaded, args.long, libraries)
    return 0


def long_prompts(loaded: LoadedModel, n: int, libraries: dict) -> None:
    """`n` concurrent requests of 2,000 prompt tokens and 64 new ones, through one engine, each build in turn
    (`libraries`: the baseline's first)."""
    tok = loaded.tokenizer
    words = tok(" ".join(["The quick brown fox jumps over the lazy dog while the river runs to the sea."] * 200))
    prompts = [[*tok(f"{i}:")["input_ids"], *words["input_ids"]][:2000] for i in range(n)]
    print(f"{n} concurrent requests of 2,000 prompt tokens and 64 new ones, one engine, 2 rounds of each build:")
    through_one_engine(loaded, prompts, libraries, 2, warm=prompts[:2])


def through_one_engine(loaded: LoadedModel, prompts: list[list[int]], libraries: dict, rounds: int,
                       warm: list[list[int]] | None = None, tokens: int = 64) -> None:
    """`prompts` submitted at once to one engine (no prefix cache), `tokens` new tokens each, in `rounds` rounds of
    each build (`libraries`: the baseline's first), alternating which goes first, after a warm-up of `warm` (or of
    `prompts`); prints each figure's median."""
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefix_cache=False)
    first, second = libraries
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in libraries}
    try:
        for name in libraries:
            native.library = lambda name=name: libraries[name]
            one_round(engine, warm or prompts, 4)
        for r in range(rounds):
            for name in list(libraries) if r % 2 == 0 else list(libraries)[::-1]:
                native.library = lambda name=name: libraries[name]
                figures[name].append(one_round(engine, prompts, tokens))
    finally:
        engine.stop()
        driver.stop()
    for key in figures[second][0]:
        before = statistics.median(f[key] for f in figures[first])
        after = statistics.median(f[key] for f in figures[second])
        print(f"  {key:<12} {first} {before:10.1f}  {second} {after:10.1f}  ({second} / {first} {after / before:.2f})",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
