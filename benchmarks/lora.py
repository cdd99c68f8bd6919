"""What LoRA adapters cost the engine: greedy throughput of C concurrent requests to the base model
alone, against the same requests spread over several random adapters (and so each step holding
all of them), in alternating rounds on one engine.

    python -m benchmarks.lora [--source bundled:smollm2-135m-instruct | tiny] [--rounds 4]
                              [--concurrency 16] [--adapters 4] [--rank 8] [--tokens 64] [--dtype auto]

The model is converted from the bundled GGUF by the registry's importer (from its conversion
cache when `--conversion-cache` names one), or is the tests' tiny random Llama. The adapters are
PEFT's own (`get_peft_model` with random A and B, all seven projections, saved by
`save_pretrained`), read and loaded as the worker does. Every request generates exactly
`--tokens` tokens (EOS ignored); the prefix cache is off, so no round reuses another's prompts.
Rounds of the two kinds alternate in pairs, the order flipping from pair to pair, so both see
the same machine in the same minute. Printed: tokens per second of each kind (the median over
the rounds) and the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from llmos.common.adapters import MODULES, read_adapter
from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver, Sequence, lora
from llmos.engine.loader import load_model, pick_device, pick_dtype
from llmos.engine.lora import Adapter, load_adapter

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "Explain photosynthesis.",
           "List three prime numbers and say why.", "Who wrote Hamlet, and when?", "How do planes fly?",
           "Give me a pasta recipe.", "What is 17 times 23?", "Describe a sunrise in the mountains.",
           "Why is the sky blue?", "Name four planets of the solar system.", "What does a compiler do?",
           "Summarize the plot of Cinderella.", "How does a bicycle stay upright?", "What is a prime number?",
           "Tell me about the Roman empire."]


def model_directory(source: str, work: Path, conversion_cache: str) -> Path:
    if source == "tiny":
        from tests.support.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny")
    if source.startswith("bundled:"):
        from llmos.registry.bundled import smollm2_gguf
        from llmos.registry.importer import Importer
        from llmos.registry.sources import SourcePolicy

        gguf = smollm2_gguf()
        importer = Importer(work / "store", SourcePolicy([gguf.parent]),
                            conversion_cache=Path(conversion_cache) if conversion_cache else None)
        source_format, digest = importer.source_digest(gguf)
        return asyncio.run(importer.bring_in(gguf, source_format, digest)).path
    return Path(source)


def save_adapters(directory: Path, count: int, rank: int, work: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=list(MODULES))
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(work / f"adapter{i}")
        model = peft_model.unload()
        paths.append(work / f"adapter{i}")
    return paths


def one_round(engine: Engine, prompt_ids: list[list[int]], adapters: list[Adapter | None], tokens: int) -> float:
    """Submits every prompt at once (prompt i under adapters[i % len]); returns tokens per second."""
    done = threading.Semaphore(0)

    def deliver(item) -> None:
        if isinstance(item, Exception) or item.finish_reason is not None:
            done.release()

    params = SamplingParams(ignore_eos=True)
    started = time.perf_counter()
    for i, ids in enumerate(prompt_ids):
        engine.submit(Sequence(f"r{i}", ids, params, tokens, deliver, adapter=adapters[i % len(adapters)]))
    for _ in prompt_ids:
        done.acquire()
    return len(prompt_ids) * tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="bundled:smollm2-135m-instruct",
                        help="bundled:NAME, a safetensors directory, or tiny (the tests' random Llama)")
    parser.add_argument("--conversion-cache", default="", help="the registry's conversion cache directory")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--masked-rows", type=int, default=lora.MASKED_ROWS,
                        help="steps of at most this many rows run the masked products, larger ones gather "
                             "(0: every step gathers)")
    args = parser.parse_args()
    lora.MASKED_ROWS = args.masked_rows

    with tempfile.TemporaryDirectory(prefix="llmos-bench-lora-") as scratch:
        work = Path(scratch)
        directory = model_directory(args.source, work, args.conversion_cache)
        base_config = json.loads((directory / "config.json").read_text())
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        loaded = load_model("bench", str(directory), device, dtype, args.concurrency * 512, 512)
        adapters = [load_adapter(f"a{i}", path, loaded.runner, read_adapter(path, base_config, args.rank))
                    for i, path in enumerate(save_adapters(directory, args.adapters, args.rank, work))]
        driver = EngineDriver()
        driver.start_thread()
        engine = Engine("bench", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefix_cache=False,
                        max_adapters_per_step=args.adapters)
        tok = loaded.tokenizer
        prompt_ids = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
                      if tok.chat_template else tok(PROMPTS[i % len(PROMPTS)])["input_ids"]
                      for i in range(args.concurrency)]
        try:
            one_round(engine, prompt_ids, [None], 8)                    # warm both paths
            one_round(engine, prompt_ids, adapters, 8)
            base, mixed = [], []
            for i in range(args.rounds):            # base then mixed, then mixed then base: drift cancels
                kinds = [(base, [None]), (mixed, adapters)]
                for results, used in kinds if i % 2 == 0 else kinds[::-1]:
                    results.append(one_round(engine, prompt_ids, used, args.tokens))
        finally:
            engine.stop()
            driver.stop()
    b, m = statistics.median(base), statistics.median(mixed)
    ratio = statistics.median(x / y for x, y in zip(mixed, base, strict=True))
    print(f"{args.source} in {str(dtype).removeprefix('torch.')} on {device}, {args.concurrency} concurrent greedy "
          f"requests of {args.tokens} tokens, {args.rounds} rounds each")
    print(f"base alone:                  {b:8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in base)})")
    print(f"{args.adapters} rank-{args.rank} adapters mixed:   {m:8.1f} tokens/s  "
          f"(rounds: {', '.join(f'{x:.1f}' for x in mixed)})")
    print(f"ratio mixed / base: {ratio:.2f}x (the median over the round pairs; "
          f"adapters: {sum(a.nbytes for a in adapters) / 2**20:.1f} MiB loaded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
