"""LoRA adapters on the engine, against PEFT itself: adapters saved by PEFT's `save_pretrained` are
checked by `read_adapter` (and refused for what the engine does not run), and greedy output
through the engine, for several adapters and the base model in the same steps, equals PEFT's
`generate()` for each, in float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmos.common.adapters import read_adapter
from llmos.common.domain import SamplingParams
from llmos.common.errors import FailedPrecondition, InvalidArgument
from llmos.engine import Engine, EngineDriver, EngineEvents, Sequence, lora
from llmos.engine.loader import load_model
from llmos.engine.lora import load_adapter
from tests.integration.test_engine import PROMPTS, Collector, Running, wait_all
from tests.support.device import ENGINE_DEVICE
from tests.support.lora import ALL_PROJECTIONS as ALL
from tests.support.lora import save_adapter

MAX_NEW = 24
LONG = ("The capital of France is Paris. The capital of Italy is Rome. Once upon a time there was a small "
        "model that answered questions, and llmos streams tokens from workers through the gateway.")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three adapters of the tiny model: all seven projections, attention only (rsLoRA), MLP only."""
    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {
        "all": save_adapter(model, root / "all", 1),
        "attn": save_adapter(model, root / "attn", 2, target_modules=["q_proj", "v_proj", "o_proj"], r=4,
                             use_rslora=True),
        "mlp": save_adapter(model, root / "mlp", 3, target_modules=["gate_proj", "up_proj", "down_proj"],
                            lora_alpha=32),
    }


@pytest.fixture(scope="module")
def base_config(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "config.json").read_text())


def generate(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters):
    """PEFT's (and for the base model transformers') greedy output, by adapter (None: the base)
    and prompt, computed once and on demand."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models: dict = {}
    answers: dict = {}

    def answer(adapter: str | None, prompt: str) -> list[int]:
        if (adapter, prompt) not in answers:
            if adapter not in models:
                model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
                if adapter is not None:
                    model = PeftModel.from_pretrained(model, adapters[adapter])
                models[adapter] = model.eval()
            answers[adapter, prompt] = generate(models[adapter], tokenizer, prompt)
        return answers[adapter, prompt]
    return answer


class Steps(EngineEvents):
    """Each step's batch: the adapter name of each sequence (None: the base model)."""

    def __init__(self) -> None:
        self.batches: list[list[str | None]] = []

    def step(self, model, batch, prefill_tokens, kv_used, kv_capacity, start_ns, end_ns) -> None:
        self.batches.append([None if s.adapter is None else s.adapter.name for s in batch])


def engine_with(tiny_model_dir, base_config, adapters, max_adapters_per_step=4, prefix_cache=True, start=True):
    """An engine on the tiny model with the adapters loaded, its step events, and the adapters."""
    loaded = load_model("m", str(tiny_model_dir), ENGINE_DEVICE, torch.float32, 16 * 512, 512)
    driver = EngineDriver()
    events = Steps()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, events,
                    prefix_cache=prefix_cache, max_adapters_per_step=max_adapters_per_step)
    running = {name: load_adapter(name, path, loaded.runner, read_adapter(path, base_config, 64))
               for name, path in adapters.items()}
    if start:
        driver.start_thread()
    return loaded, Running(engine, driver), events, running


def submit(engine, tokenizer, prompt, adapter=None, rid="r") -> Collector:
    collector = Collector()
    engine.submit(Sequence(rid, tokenizer(prompt)["input_ids"], SamplingParams(), MAX_NEW, collector,
                           adapter=adapter))
    return collector


# read_adapter -----------------------------------------------------------------------------------

def test_a_peft_adapter_is_read_with_its_rank_targets_and_bytes(adapters, base_config):
    facts = read_adapter(adapters["all"], base_config, max_rank=64)
    assert (facts.rank, facts.alpha, facts.scaling) == (8, 16.0, 2.0)
    assert facts.target_modules == tuple(sorted(ALL)) and facts.layers == (0, 1)
    # Per layer: A [8, in] and B [out, 8] of q, k, v, o (64 -> 64, 32, 32, 64), gate, up (64 -> 128),
    # down (128 -> 64), in float32.
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert facts.params == 2 * per_layer and facts.nbytes == 4 * facts.params
    attn = read_adapter(adapters["attn"], base_config, max_rank=64)
    assert attn.target_modules == ("o_proj", "q_proj", "v_proj") and attn.scaling == 16 / 2   # rsLoRA: 16 / sqrt(4)


def refusal(directory, config, max_rank=64):
    with pytest.raises((InvalidArgument, FailedPrecondition)) as caught:
        read_adapter(directory, config, max_rank)
    return caught.value


def test_pickled_weights_are_refused_unread(adapters, base_config, tmp_path):
    shutil.copy(adapters["all"] / "adapter_config.json", tmp_path / "adapter_config.json")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    error = refusal(tmp_path, base_config)
    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "ADAPTER_PICKLE_WEIGHTS")
    assert "adapter_model.bin" in error.message


def test_a_directory_without_a_lora_config_is_refused(adapters, base_config, tmp_path):
    error = refusal(tmp_path, base_config)
    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "ADAPTER_INVALID")
    shutil.copy(adapters["all"] / "adapter_model.safetensors", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    error = refusal(tmp_path, base_config)
    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "ADAPTER_INVALID")


def test_a_rank_over_the_limit_is_refused(adapters, base_config):
    error = refusal(adapters["all"], base_config, max_rank=4)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_RANK_UNSUPPORTED")
    assert error.metadata["rank"] == "8"


def test_an_adapter_of_another_base_model_is_refused_naming_the_tensor(base_config, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=base_config["vocab_size"], hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    error = refusal(save_adapter(other, tmp_path / "other", 4), base_config)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_BASE_MISMATCH")
    assert "lora_" in error.metadata["tensor"] and error.metadata["expected"] != error.metadata["found"]
    assert error.metadata["tensor"] in error.message


def test_an_adapter_of_a_deeper_base_model_is_refused(base_config, tmp_path):
    deeper = LlamaForCausalLM(LlamaConfig(**{k: base_config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")},
        num_hidden_layers=3))
    error = refusal(save_adapter(deeper, tmp_path / "deeper", 5), base_config)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_BASE_MISMATCH")
    assert ".layers.2." in error.metadata["tensor"]


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_an_adapter_of_the_lm_head_or_embeddings_is_refused(tiny_model_dir, base_config, tmp_path, target):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    directory = save_adapter(model, tmp_path / target, 6, target_modules=["q_proj", target])
    error = refusal(directory, base_config)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_MODULES_UNSUPPORTED")
    assert target in error.message
    # The saved tensors alone say so too (a target_modules pattern names no module).
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ".*"}))
    error = refusal(directory, base_config)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_MODULES_UNSUPPORTED")


def test_dora_is_refused(tiny_model_dir, base_config, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    error = refusal(save_adapter(model, tmp_path / "dora", 7, use_dora=True), base_config)
    assert (error.code, error.reason) == ("FAILED_PRECONDITION", "ADAPTER_MODULES_UNSUPPORTED")


# the engine ---------------------------------------------------------------------------------------

def test_greedy_output_with_an_adapter_equals_peft_generate(tiny_model_dir, base_config, adapters, expected):
    loaded, engine, _, loaded_adapters = engine_with(tiny_model_dir, base_config, {"all": adapters["all"]})
    try:
        run = submit(engine, loaded.tokenizer, PROMPTS[0], loaded_adapters["all"])
        wait_all([run])
    finally:
        engine.stop()
    assert run.ids == expected("all", PROMPTS[0])
    assert run.ids != expected(None, PROMPTS[0]), "the adapter does not change the output"


def run_together(engine, loaded, loaded_adapters, plan) -> list:
    """Runs (prompt, adapter name or None) pairs, all submitted before the engine's driver starts,
    so they join its first step; returns their collectors."""
    try:
        runs = [submit(engine, loaded.tokenizer, prompt, loaded_adapters.get(name), f"r{i}")
                for i, (prompt, name) in enumerate(plan)]
        engine.driver.start_thread()
        wait_all(runs)
    finally:
        engine.stop()
    return runs


@pytest.mark.parametrize("masked_rows", [0, 4096], ids=["gathered", "masked"])
def test_three_adapters_and_the_base_share_steps_each_as_its_own_model(tiny_model_dir, base_config, adapters,
                                                                      expected, masked_rows, monkeypatch):
    monkeypatch.setattr(lora, "MASKED_ROWS", masked_rows)     # every step one way, then the other
    loaded, engine, events, loaded_adapters = engine_with(tiny_model_dir, base_config, adapters, start=False)
    plan = [(PROMPTS[i], [None, "all", "attn", "mlp"][i % 4]) for i in range(8)]
    runs = run_together(engine, loaded, loaded_adapters, plan)
    assert sorted(events.batches[0], key=str) == sorted([name for _, name in plan], key=str)
    assert sum(len(set(batch)) == 4 for batch in events.batches) >= MAX_NEW // 2
    for run, (prompt, name) in zip(runs, plan, strict=True):
        assert run.ids == expected(name, prompt), (name, prompt)
    assert len({tuple(expected(name, PROMPTS[0])) for name in (None, "all", "attn", "mlp")}) == 4


@pytest.mark.parametrize("masked_rows", [0, 4096], ids=["gathered", "masked"])
def test_base_rows_beside_adapters_are_bit_for_bit_the_base_alone(tiny_model_dir, base_config, adapters,
                                                                  masked_rows, monkeypatch):
    """Tokens and log-probabilities of a base request alone, and in steps full of adapter rows."""
    monkeypatch.setattr(lora, "MASKED_ROWS", masked_rows)
    loaded, engine, events, loaded_adapters = engine_with(tiny_model_dir, base_config, adapters)
    tok = loaded.tokenizer
    params = SamplingParams(logprobs=True, ignore_eos=True)

    def base(rid):
        run = Collector()
        engine.submit(Sequence(rid, tok(PROMPTS[1])["input_ids"], params, MAX_NEW, run))
        return run
    try:
        alone = base("alone")
        wait_all([alone])
        others = [submit(engine, tok, p, loaded_adapters[name], f"o{i}")
                  for i, (p, name) in enumerate(zip(PROMPTS[2:], ["all", "attn", "mlp"] * 2, strict=False))]
        busy = base("busy")
        wait_all([*others, busy])
    finally:
        engine.stop()
    assert sum(None in batch and len(batch) > 1 for batch in events.batches) >= MAX_NEW // 2
    assert [t for c in busy.chunks for t in c.token_ids] == [t for c in alone.chunks for t in c.token_ids]
    assert [p for c in busy.chunks for p in c.logprobs] == [p for c in alone.chunks for p in c.logprobs]


def test_at_most_max_adapters_per_step_run_together_and_each_gets_its_turns(tiny_model_dir, base_config, adapters,
                                                                           expected):
    loaded, engine, events, loaded_adapters = engine_with(tiny_model_dir, base_config, adapters,
                                                          max_adapters_per_step=2, start=False)
    plan = [(PROMPTS[i], ["all", "attn", "mlp"][i % 3]) for i in range(6)] + [(PROMPTS[6], None)]
    runs = run_together(engine, loaded, loaded_adapters, plan)
    distinct = [set(batch) - {None} for batch in events.batches]
    assert max(len(d) for d in distinct) == 2
    # The base sequence runs every step (one per token); the three adapters share turns evenly.
    assert sum(None in batch for batch in events.batches) == MAX_NEW
    turns = {name: sum(name in d for d in distinct[:30]) for name in ("all", "attn", "mlp")}
    assert max(turns.values()) - min(turns.values()) <= 1, turns
    for run, (prompt, name) in zip(runs, plan, strict=True):
        assert run.ids == expected(name, prompt), (name, prompt)


def test_the_prefix_cache_reuses_keys_and_values_only_under_the_same_adapter(tiny_model_dir, base_config,
                                                                             adapters, expected):
    loaded, engine, _, loaded_adapters = engine_with(tiny_model_dir, base_config, adapters)
    tok, adapter = loaded.tokenizer, loaded_adapters["all"]
    try:
        def alone(name):
            run = submit(engine, tok, LONG, loaded_adapters.get(name))
            wait_all([run])
            return run

        base = alone(None)                       # its keys and values stay in the prefix cache
        first = alone("all")
        second = alone("all")
        again = alone(None)
        # In flight together: neither takes the other's computed prompt.
        together = [submit(engine, tok, LONG, adapter, "a"), submit(engine, tok, LONG, loaded_adapters["mlp"], "m")]
        wait_all(together)
    finally:
        engine.stop()
    reused = [r.chunks[-1].usage.cached_prompt_tokens > 0 for r in (base, first, second, again, *together)]
    assert reused == [False, False, True, True, True, False]
    assert base.ids == again.ids == expected(None, LONG)
    assert first.ids == second.ids == together[0].ids == expected("all", LONG)
    assert together[1].ids == expected("mlp", LONG)
    assert first.ids != base.ids


def test_an_engine_on_the_generic_forward_refuses_adapters(tmp_path, adapters, base_config):
    from tests.support.tiny_model import build_tiny_architecture

    path = build_tiny_architecture(tmp_path / "qwen3", "qwen3")
    loaded = load_model("g", str(path), ENGINE_DEVICE, torch.float32, 2, 64)
    assert loaded.runner.supports_adapters is False
    facts = read_adapter(adapters["all"], base_config, 64)
    with pytest.raises(FailedPrecondition) as caught:
        load_adapter("all", adapters["all"], loaded.runner, facts)
    assert caught.value.reason == "ADAPTERS_NOT_SUPPORTED"
