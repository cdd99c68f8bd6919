"""Batch invariance in bfloat16 and float32: a greedy request's tokens and log-probabilities, bit for bit, are
the same alone and in a busy batch (other prompts of other lengths prefilling and decoding beside
it, sampling requests joining and leaving)."""

from __future__ import annotations

import pytest
import torch

from llmos.common.devices import cpu_kind
from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver, Sequence, matmul
from llmos.engine.attention import compiles_attention
from llmos.engine.loader import load_model
from tests.integration.test_engine import Collector, Running, wait_all
from tests.support.device import ENGINE_DEVICE

PROMPTS = ["The capital of France is", "Once upon a time there was a river that ran",
           "numbers 0123 4567 89", "A", "llmos streams tokens to every client that asks for them politely",
           "Emoji too: 🙂"]
NOISE = ["x y z " * n for n in (1, 7, 19, 40, 3, 11)]


QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "How do planes fly?", "Give me a pasta recipe.",
             "What is 17 times 23?"]
GREEDY = SamplingParams(logprobs=True, ignore_eos=True)


def start(path, dtype, prefix_cache=False, prefill_budget=24, compile=False):
    loaded = load_model("m", str(path), ENGINE_DEVICE, dtype, 16 * 512, 512, compile=compile)
    assert loaded.compiled == (compile and compiles_attention(ENGINE_DEVICE, dtype))
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefill_budget,
                    prefix_cache=prefix_cache)
    return loaded, Running(engine, driver)


def submitter(engine, tok):
    def submit(prompt, rid, params=GREEDY, max_new=20):
        run = Collector()
        engine.submit(Sequence(rid, tok(prompt)["input_ids"], params, max_new, run))
        return run
    return submit


def result(run) -> tuple[list[int], list[float]]:
    return [t for c in run.chunks for t in c.token_ids], [p for c in run.chunks for p in c.logprobs]


def chats_alone_and_together(path, dtype, compile=False) -> tuple[list, list]:
    """SmolLM2's chat prompts one at a time, then all eight at once (prefilled in one step of 256
    tokens, decoded together)."""
    loaded, engine = start(path, dtype, prefill_budget=256, compile=compile)
    tok = loaded.tokenizer
    submit = submitter(engine, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in QUESTIONS]
    try:
        alone = []
        for i, prompt in enumerate(prompts):
            run = submit(prompt, f"alone{i}", max_new=8)
            wait_all([run], 300)
            alone.append(result(run))
        together = [submit(p, f"together{i}", max_new=8) for i, p in enumerate(prompts)]
        wait_all(together, 300)
        return alone, [result(run) for run in together]
    finally:
        engine.stop()


# bf16 on a CPU with AMX (the engine's pair kernel on AMX's tiles) and on one with avx512_bf16 alone (the pair
# kernel on vdpbf16ps): a row's products are its own on either (`test_pair_products.py`), and so its answer.
@pytest.mark.smollm2
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_smollm2_bf16_chats_alone_equal_the_same_chats_together(smollm2_dir, compile):
    """(float32's invariance: the busy-batch tests below.) Compiled: decode attention through the
    kernel that reads the block tables in place."""
    alone, together = chats_alone_and_together(smollm2_dir, torch.bfloat16, compile)
    assert together == alone


def answers(path, dtype, prefix_cache=False, compile=False) -> tuple[list, list]:
    """Each prompt alone, then all of them at once among sampling requests that come and go."""
    loaded, engine = start(path, dtype, prefix_cache, compile=compile)
    submit = submitter(engine, loaded.tokenizer)
    try:
        alone = []
        for i, prompt in enumerate(PROMPTS):
            run = submit(prompt, f"alone{i}")
            wait_all([run])
            alone.append(result(run))
        noise = [submit(p, f"noise{i}", SamplingParams(temperature=1.0, seed=i), max_new=4 + 5 * i)
                 for i, p in enumerate(NOISE[:3])]
        busy = [submit(p, f"busy{i}") for i, p in enumerate(PROMPTS)]
        noise += [submit(p, f"late{i}", SamplingParams(temperature=0.7, seed=i), max_new=3 + 4 * i)
                  for i, p in enumerate(NOISE[3:])]
        wait_all(busy + noise)
        return alone, [result(run) for run in busy]
    finally:
        engine.stop()


@pytest.mark.parametrize(("dtype", "prefix_cache", "compile"), [
    (torch.bfloat16, False, False), (torch.bfloat16, True, False), (torch.float32, True, False),
    (torch.bfloat16, True, True)])
def test_greedy_tokens_and_logprobs_alone_equal_those_in_a_busy_batch(tiny_model_dir, dtype, prefix_cache, compile):
    alone, busy = answers(tiny_model_dir, dtype, prefix_cache, compile)
    assert all(len(ids) == 20 for ids, _ in alone)
    assert busy == alone


# Products of at least 4 rows, run whole, are batch-invariant through avx512_bf16's kernels only: elsewhere
# they take kernels whose order may depend on the rows, so that path is only tested where it is taken.
ONLY_WITH_AVX512_BF16 = pytest.mark.skipif(cpu_kind() != "avx512_bf16",
                                           reason="whole bf16 products are taken on a CPU with avx512_bf16 only")
KINDS = [pytest.param("amx"), pytest.param("avx512_bf16", marks=ONLY_WITH_AVX512_BF16)]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_in_row_tiles_greedy_tokens_alone_equal_those_in_a_busy_batch(tiny_model_dir, monkeypatch, kind):
    """oneDNN's products on a CPU with native bf16, where the pair kernel does not take a matrix (in tiles of
    16 rows with AMX, of at least 4 rows with avx512_bf16 alone; attention in float32); the tiles taken here
    whatever the CPU."""
    monkeypatch.setattr(matmul, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(matmul, "cpu_kind", lambda: kind)
    monkeypatch.setattr(matmul, "pairs_take_tiles", lambda n, k: False)
    alone, busy = answers(tiny_model_dir, torch.bfloat16)
    assert all(len(ids) == 20 for ids, _ in alone)
    assert busy == alone


@pytest.mark.parametrize(("kind", "tile"), [("amx", matmul.ROW_TILE),
                                           pytest.param("avx512_bf16", None, marks=ONLY_WITH_AVX512_BF16)])
def test_products_in_row_tiles_are_the_products(monkeypatch, kind, tile):
    monkeypatch.setattr(matmul, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(matmul, "cpu_kind", lambda: kind)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator).bfloat16()
    tiled = matmul.prepare(weight, "", torch.device("cpu"), torch.bfloat16)
    if kind == "avx512_bf16":       # the engine's own kernel there (`test_pair_products.py`)
        assert isinstance(tiled, matmul.PairedWeight)
    else:                           # prepacked where oneDNN has bf16 kernels, else as stored; in tiles
        assert isinstance(tiled, (matmul.PackedWeight, matmul.TiledWeight)) and tiled.tile == tile
    for rows in (0, 1, 15, 16, 17, 40):
        x = torch.randn(rows, 40, generator=generator).bfloat16()
        out = matmul.linear(x, tiled)
        assert out.shape == (rows, 48)
        assert torch.allclose(out.float(), (x.float() @ weight.float().t()), atol=0.1, rtol=0.02)
        # A row's product does not depend on the rows beside it.
        assert torch.equal(matmul.linear(x[:1], tiled), out[:1])
