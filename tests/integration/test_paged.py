"""The paged KV cache on a real model (float32): capacity is memory, not slots; a sequence that
cannot grow is preempted and computes again what it held, and every answer is token for token
what `generate()` gives alone; nothing is left held once requests end or are cancelled."""

from __future__ import annotations

import random
import threading

import torch

from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver, EngineEvents, Sequence
from llmos.engine.attention import BLOCK
from llmos.engine.loader import load_model
from tests.integration.test_engine import Collector, Running, wait_all
from tests.integration.test_prefix_cache import reference, run  # noqa: F401 - a fixture
from tests.support.device import ENGINE_DEVICE


class Batches(EngineEvents):
    """Each step's batch size, and the sequences preempted."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.preempted_ids: list[str] = []

    def step(self, model, batch, prefill_tokens, kv_used, kv_capacity, start_ns, end_ns):
        self.batches.append([s.request_id for s in batch])

    def most_at_once(self, prefix: str) -> int:
        return max(sum(1 for r in batch if r.startswith(prefix)) for batch in self.batches)

    def preempted(self, model, seq, now_ns):
        self.preempted_ids.append(seq.request_id)


def settled(engine):
    """The engine's figures once no sequence runs or waits (the last ones leave right after their
    last chunk is delivered)."""
    for _ in range(600):
        stats = engine.stats()
        if stats.running == stats.waiting == 0:
            return stats
        threading.Event().wait(0.05)
    return stats


def start(path, kv_tokens, max_len=128, prefix_cache=True):
    loaded = load_model("m", str(path), ENGINE_DEVICE, torch.float32, kv_tokens, max_len)
    driver = EngineDriver()
    driver.start_thread()
    events = Batches()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, events, prefix_cache)
    return loaded, Running(engine, driver), events


def test_short_requests_run_together_where_long_ones_take_the_whole_pool(tiny_model_dir):
    loaded, engine, events = start(tiny_model_dir, kv_tokens=16 * BLOCK, max_len=256)
    tok = loaded.tokenizer
    try:
        # All twelve submitted between two steps (on the driver's thread): none can finish before the
        # last arrives, however slowly this thread gets its turns.
        short = engine.driver.call(lambda: [run(engine, tok(f"Hi {i}")["input_ids"], f"s{i}", max_new=4)
                                            for i in range(12)]).result(timeout=60)
        wait_all(short)
        long = [run(engine, tok(f"{i} " + "word " * 200)["input_ids"][:190], f"l{i}", max_new=4) for i in range(3)]
        wait_all(long)
        stats = settled(engine)
    finally:
        engine.stop()
    # Twelve short ones in the pool at once; a long one needs 12 of its 16 blocks.
    assert events.most_at_once("s") == 12 and events.most_at_once("l") == 1
    assert stats.running == 0 and stats.blocks_free == stats.blocks_total == 16 and stats.preemptions == 0


def test_sequences_that_outgrow_the_pool_are_preempted_and_answer_as_alone(tiny_model_dir, reference):  # noqa: F811
    """Six sequences that grow to five blocks each in a pool of eight: the last to join gives its
    blocks back whenever an older one needs one, and computes them again when it resumes."""
    loaded, engine, events = start(tiny_model_dir, kv_tokens=8 * BLOCK)
    tok = loaded.tokenizer
    prompts = [tok(f"Story {i}: once upon a time" + " there" * i)["input_ids"] for i in range(6)]
    try:
        runs = [run(engine, p, f"r{i}", max_new=60) for i, p in enumerate(prompts)]
        wait_all(runs)
        stats = settled(engine)
    finally:
        engine.stop()
    assert stats.preemptions >= 3 and len(events.preempted_ids) == stats.preemptions
    for i, (prompt, r) in enumerate(zip(prompts, runs, strict=True)):
        assert r.error is None and r.ids == reference(prompt, 60), i
        assert [t for c in r.chunks for t in c.token_ids] == r.ids      # one chunk per token, none repeated
    assert stats.running == 0 and stats.blocks_free == stats.blocks_total


def test_no_block_is_left_held_after_random_requests_and_cancellations(tiny_model_dir):
    loaded, engine, events = start(tiny_model_dir, kv_tokens=24 * BLOCK, max_len=256)
    tok = loaded.tokenizer
    rng = random.Random(3)
    stems = [tok("A shared opening that several prompts use, " * 2)["input_ids"], []]
    kept, cancelled = [], []
    try:
        for i in range(40):
            ids = (rng.choice(stems) + tok(f" request {i}" + " more" * rng.randrange(30))["input_ids"])[:200]
            collector = Collector()
            seq = Sequence(f"q{i}", ids, SamplingParams(ignore_eos=True), rng.randrange(1, 40), collector)
            engine.submit(seq)
            if rng.random() < 0.4:
                threading.Timer(rng.random() * 0.05, engine.engine.cancel, [seq]).start()
                cancelled.append(collector)
            else:
                kept.append(collector)
        wait_all(kept)
        stats = settled(engine)                # the cancelled ones leave before the next step
    finally:
        engine.stop()
    assert len(kept) > 10 and len(cancelled) > 10
    assert stats.running == stats.waiting == 0 and stats.blocks_free == stats.blocks_total == 24
    assert stats.kv_tokens_used == 0 and stats.kv_tokens_kept > 0
