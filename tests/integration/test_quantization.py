"""Weight-only int8 as a model variant, on SmolLM2 in float32: its quality check against the
stored weights (perplexity of a fixed text, greedy agreement on a prompt set) and its memory."""

from __future__ import annotations

import pytest
import torch

from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver, Sequence
from llmos.engine.attention import Part, Step, blocks_for
from llmos.engine.loader import load_model
from tests.integration.test_engine import PROMPTS, Collector, wait_all

TEXT = ("The river rises in the mountains and runs north through farmland and forest before it reaches the sea. "
        "Towns grew up along its banks, where boats carried grain, timber and wine to the ports. In winter the "
        "water is high and fast; in late summer it slows and the sandbanks show. A bridge of stone has crossed "
        "it at the old market town for six hundred years, and the ferry that ran before it is remembered in the "
        "name of a street.")


def perplexity(runner, ids: list[int]) -> float:
    n = len(ids)
    step = Step([Part(list(range(1, blocks_for(n) + 1)), 0, n)], runner.device)
    logits = runner.forward(torch.tensor(ids), step, torch.arange(n - 1))
    return torch.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))).item()


def greedy(loaded, max_new=32) -> list[list[int]]:
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, prefix_cache=False)
    try:
        runs = []
        for i, prompt in enumerate(PROMPTS):
            runs.append(Collector())
            engine.submit(Sequence(f"r{i}", loaded.tokenizer(prompt)["input_ids"], SamplingParams(ignore_eos=True),
                                   max_new, runs[-1]))
        wait_all(runs)
        return [run.ids for run in runs]
    finally:
        engine.stop()
        driver.stop()


def agreed(a: list[int], b: list[int]) -> int:
    """Tokens before the first that differs."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.mark.smollm2
def test_int8_weights_keep_the_models_perplexity_and_most_greedy_answers(smollm2_dir):
    figures = {}
    for variant in ("", "int8"):
        loaded = load_model("m", str(smollm2_dir), torch.device("cpu"), torch.float32, 8, 256, variant)
        assert loaded.quantization == variant
        ids = loaded.tokenizer(TEXT)["input_ids"]
        figures[variant] = (perplexity(loaded.runner, ids), greedy(loaded), loaded.measured_bytes)
        del loaded
    (ppl, dense, size), (ppl8, quantized, size8) = figures[""], figures["int8"]
    pairs = list(zip(dense, quantized, strict=True))
    print(f"\nperplexity {ppl:.3f} -> {ppl8:.3f}; identical answers {sum(a == b for a, b in pairs)} of {len(pairs)};"
          f" tokens before the first difference {[agreed(a, b) for a, b in pairs]}; bytes {size} -> {size8}")
    assert ppl8 <= ppl * 1.03
    assert sum(a == b for a, b in pairs) >= 2
    assert sum(agreed(a, b) for a, b in pairs) / len(pairs) >= 8
    # The layers' and the head's matrices at a byte per weight (the embedding table stays).
    assert size8 < size * 0.7
