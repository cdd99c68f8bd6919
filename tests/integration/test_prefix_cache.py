"""The prefix cache on a real model (float32): a prompt that starts with what an earlier request
computed shares those full blocks, and its output is token for token what `generate()` gives
alone, however the kept blocks were shared, evicted and reused."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver, EngineEvents, Sequence
from llmos.engine.attention import BLOCK
from llmos.engine.loader import load_model
from tests.integration.test_engine import Collector, Running, wait_all
from tests.support.device import ENGINE_DEVICE


class Joins(EngineEvents):
    """What the engine reported of each sequence that joined: its prompt and reused positions."""

    def __init__(self) -> None:
        self.reused: dict[str, tuple[int, int]] = {}

    def joined(self, model, seq, now_ns):
        self.reused[seq.request_id] = (len(seq.prompt_ids), seq.reused)


def start(path, slots, prefix_cache=True, kv_tokens=None, max_len=512):
    loaded = load_model("m", str(path), ENGINE_DEVICE, torch.float32, kv_tokens or slots * max_len, max_len)
    driver = EngineDriver()
    driver.start_thread()
    joins = Joins()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, joins, prefix_cache,
                    max_running=slots)
    return loaded, Running(engine, driver), joins


def run(engine, ids, rid, max_new=12) -> Collector:
    collector = Collector()
    engine.submit(Sequence(rid, list(ids), SamplingParams(ignore_eos=True), max_new, collector))
    return collector


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def generate(ids, max_new=12):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 min_new_tokens=max_new)
        return out[0, len(ids):].tolist()
    return generate


def test_a_conversation_reuses_its_earlier_turns_and_answers_as_without(tiny_model_dir, reference):
    loaded, engine, joins = start(tiny_model_dir, slots=4)
    tok = loaded.tokenizer
    try:
        prompt = tok("System: you are terse. User: name three rivers.")["input_ids"]
        previous = 0
        for turn in range(4):
            reply = run(engine, prompt, f"turn{turn}")
            wait_all([reply])
            assert reply.ids == reference(prompt)
            final = reply.chunks[-1].usage
            # Every full block the last turn computed (its prompt, and its reply but the last
            # token, which was sampled and never fed) is there for this one.
            if turn:
                assert final.cached_prompt_tokens == (previous - 1) // BLOCK * BLOCK > 0, (turn, final, previous)
            prompt = prompt + reply.ids + tok(f" User: and {turn}?")["input_ids"]
            previous = final.prompt_tokens + final.completion_tokens
        assert engine.stats().running == 0 and engine.stats().kv_tokens_kept > 0
    finally:
        engine.stop()


def test_kept_blocks_shared_evicted_and_reused_under_load_never_change_an_answer(tiny_model_dir, reference):
    """Three at a time in a pool of 12 blocks, prompts that share prefixes of every length, sent in
    waves that overlap: kept blocks are shared by several sequences, evicted for new ones and
    found again."""
    loaded, engine, joins = start(tiny_model_dir, slots=3, kv_tokens=12 * BLOCK, max_len=128)
    tok = loaded.tokenizer
    rng = random.Random(7)
    stems = [tok(t * 3)["input_ids"] for t in ("A shared system prompt about rivers and seas. ",
                                                "Another header, of a different kind entirely. ")]
    prompts = []
    for i in range(18):
        stem = stems[i % 2]
        prompts.append(stem[:rng.randint(3, len(stem))] + tok(f" question {rng.randint(0, 3)}")["input_ids"])
    try:
        collectors = []
        for wave in range(0, len(prompts), 3):
            collectors += [run(engine, prompts[i], f"p{i}") for i in range(wave, wave + 3)]
            wait_all(collectors[-3:-1])                  # the third of each wave overlaps the next
        wait_all(collectors)
    finally:
        engine.stop()
    assert sum(1 for _, reused in joins.reused.values() if reused) >= 6, joins.reused
    assert engine.engine.blocks.evicted > 0
    for i, (prompt, collector) in enumerate(zip(prompts, collectors, strict=True)):
        assert collector.ids == reference(prompt), i


def test_a_prompt_reuses_what_a_running_sequence_has_computed(tiny_model_dir, reference):
    loaded, engine, joins = start(tiny_model_dir, slots=4)
    tok = loaded.tokenizer
    system = tok("A long system prompt that every request of this tenant starts with. " * 3)["input_ids"]
    try:
        first = run(engine, system + tok(" First?")["input_ids"], "first", max_new=64)
        while len(first.chunks) < 2:                        # prefilled and decoding
            threading.Event().wait(0.005)
        assert not first.done.is_set()                      # so nothing is kept: only `first` can give it
        second = run(engine, system + tok(" Second?")["input_ids"], "second", max_new=24)
        wait_all([first, second])
    finally:
        engine.stop()
    assert first.chunks[-1].finish_reason is not None and len(first.ids) == 64
    assert joins.reused["second"][1] == len(system) // BLOCK * BLOCK > 0, joins.reused
    assert first.ids == reference(system + tok(" First?")["input_ids"], 64)
    assert second.ids == reference(system + tok(" Second?")["input_ids"], 24)


def test_without_the_prefix_cache_nothing_is_reused(tiny_model_dir, reference):
    loaded, engine, joins = start(tiny_model_dir, slots=2, prefix_cache=False)
    try:
        prompt = loaded.tokenizer("The same prompt twice")["input_ids"]
        for rid in ("one", "two"):
            reply = run(engine, prompt, rid)
            wait_all([reply])
            assert reply.ids == reference(prompt) and reply.chunks[-1].usage.cached_prompt_tokens == 0
        assert joins.reused == {"one": (len(prompt), 0), "two": (len(prompt), 0)}
        assert engine.stats().kv_tokens_kept == 0
    finally:
        engine.stop()
