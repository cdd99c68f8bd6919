"""The engine on real models: batched output equals transformers' generate() token for token,
sampling is independent of batch neighbours, stop strings and non-ASCII text stream exactly."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.common.domain import Chunk, SamplingParams
from llmos.engine import Engine, EngineDriver, EngineEvents, Sequence
from llmos.engine.attention import compiles_attention
from llmos.engine.loader import load_model
from tests.support.device import ENGINE_DEVICE
from tests.support.wait import wait_for

PROMPTS = ["The capital of France is", "Once upon a time", "Café déjà vu", "東京は日本の",
           "Emoji too: 🙂", "llmos streams tokens", "numbers 0123", "The capital of Italy"]


class Collector:
    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.error: Exception | None = None
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, Exception):
            self.error = item
            self.done.set()
            return
        self.chunks.append(item)
        if item.finish_reason is not None:
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


class Running:
    """An engine on a driver thread of its own; `stop` ends both."""

    def __init__(self, engine, driver):
        self.engine, self.driver = engine, driver

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stop(self):
        self.engine.stop()
        self.driver.stop()


def start(path, slots=16, prefill_budget=256, compile=False):
    loaded = load_model("m", str(path), ENGINE_DEVICE, torch.float32, slots * 512, 512, compile=compile,
                        graphs=slots if compile else 0)
    if compile:
        assert loaded.runner.fused == compiles_attention(ENGINE_DEVICE, torch.float32)
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, prefill_budget, max_running=slots)
    return loaded, Running(engine, driver)


def submit(engine, tokenizer, prompt, params, max_new, rid="r"):
    collector = Collector()
    engine.submit(Sequence(rid, tokenizer(prompt)["input_ids"], params, max_new, collector))
    return collector


def wait_all(collectors, timeout=120):
    for c in collectors:
        assert c.done.wait(timeout), "generation did not finish"
        assert c.error is None, c.error


def reference(path, prompts, max_new):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def greedy_together_equals_alone(path, max_new, prefill_budget, compile=False):
    loaded, engine = start(path, prefill_budget=prefill_budget, compile=compile)
    try:
        tok = loaded.tokenizer
        # Half start together; the rest join while the first half is decoding.
        first = [submit(engine, tok, p, SamplingParams(), max_new, f"a{i}") for i, p in enumerate(PROMPTS[:4])]
        while not all(len(c.chunks) >= 2 or c.done.is_set() for c in first):
            threading.Event().wait(0.005)
        second = [submit(engine, tok, p, SamplingParams(), max_new, f"b{i}") for i, p in enumerate(PROMPTS[4:])]
        wait_all(first + second)
        assert [c.ids for c in first + second] == reference(path, PROMPTS, max_new)
        assert engine.stats().running == 0 and engine.stats().kv_tokens_used == 0
    finally:
        engine.stop()


# Compiled: attention through the engine's kernel and the element-wise work through its fused kernels.
COMPILED = pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])


@COMPILED
def test_greedy_batch_equals_generate_alone_tiny(tiny_model_dir, compile):
    greedy_together_equals_alone(tiny_model_dir, max_new=24, prefill_budget=4, compile=compile)


def test_repetition_penalty_matches_generate_in_a_batch(tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    try:
        params = SamplingParams(repetition_penalty=1.5)
        runs = [submit(engine, loaded.tokenizer, p, params, 24, f"p{i}") for i, p in enumerate(PROMPTS[:4])]
        wait_all(runs)
    finally:
        engine.stop()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for run, prompt in zip(runs, PROMPTS[:4], strict=True):
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
        assert run.ids == out[0, ids.shape[1]:].tolist()


@pytest.mark.smollm2
@COMPILED
def test_greedy_batch_equals_generate_alone_smollm2(smollm2_dir, compile):
    greedy_together_equals_alone(smollm2_dir, max_new=16, prefill_budget=256, compile=compile)


def test_same_seed_same_text_alone_and_in_a_busy_batch(tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    try:
        tok = loaded.tokenizer
        seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
        alone = submit(engine, tok, "Once upon a time", seeded, 30)
        wait_all([alone])
        noise = [submit(engine, tok, p, SamplingParams(temperature=1.3, seed=i, ignore_eos=True), 30, f"n{i}")
                 for i, p in enumerate(PROMPTS)]
        busy = submit(engine, tok, "Once upon a time", seeded, 30)
        wait_all([*noise, busy])
        assert busy.ids == alone.ids and busy.text == alone.text
        assert len({tuple(c.ids) for c in noise}) > 1
    finally:
        engine.stop()


def test_stop_string_across_a_token_boundary_is_cut_exactly(tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    try:
        tok = loaded.tokenizer
        params = SamplingParams(ignore_eos=True)
        full = submit(engine, tok, "The capital of France is", params, 30)
        wait_all([full])
        # A stop string made of the end of one token's text and the start of the next.
        pieces = [tok.decode(full.ids[: i + 1]) for i in range(len(full.ids))]
        boundary = next(len(pieces[i]) for i in range(3, len(pieces) - 1)
                        if len(pieces[i]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2
                        and full.text.find(full.text[len(pieces[i]) - 1:len(pieces[i]) + 1]) == len(pieces[i]) - 1)
        stop = full.text[boundary - 1:boundary + 1]
        cut = submit(engine, tok, "The capital of France is",
                     SamplingParams(ignore_eos=True, stop=(stop,)), 30)
        wait_all([cut])
        assert cut.text == full.text[:boundary - 1]
        assert stop not in cut.text
        assert cut.chunks[-1].finish_reason.value == "stop"
    finally:
        engine.stop()


def test_streamed_text_is_byte_identical_to_the_full_decode(tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    try:
        tok = loaded.tokenizer
        runs = [submit(engine, tok, p, SamplingParams(temperature=1.5, seed=i, ignore_eos=True), 40, f"s{i}")
                for i, p in enumerate(PROMPTS)]
        wait_all(runs)
        for run in runs:
            assert run.text.encode() == tok.decode(run.ids, skip_special_tokens=True).encode()
        assert any(not c.isascii() for run in runs for c in run.text), "no non-ASCII text was produced"
    finally:
        engine.stop()


@pytest.mark.smollm2
def test_smollm2_non_ascii_streams_exactly(smollm2_dir):
    loaded, engine = start(smollm2_dir)
    try:
        tok = loaded.tokenizer
        prompts = ["Le café à Paris est très", "東京の天気は", "My favourite emoji is 🙂 because"]
        runs = [submit(engine, tok, p, SamplingParams(temperature=0.8, seed=3, ignore_eos=True), 24, f"x{i}")
                for i, p in enumerate(prompts)]
        wait_all(runs)
        for run in runs:
            assert run.text.encode() == tok.decode(run.ids, skip_special_tokens=True).encode()
        assert any(not c.isascii() for run in runs for c in run.text)
    finally:
        engine.stop()


@pytest.mark.smollm2
def test_smollm2_in_bfloat16_keeps_its_answer(smollm2_dir):
    """bf16 is the default on this CPU: the lean forward must keep the model's own precision
    where it matters (norms in float32), or the answer degrades."""
    loaded = load_model("m", str(smollm2_dir), torch.device("cpu"), torch.bfloat16, 4, 256)
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver)
    try:
        tok = loaded.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=False)
        answer = Collector()
        engine.submit(Sequence("p", tok(text, add_special_tokens=False)["input_ids"], SamplingParams(), 24, answer))
        wait_all([answer])
        assert "Paris" in answer.text, answer.text
    finally:
        engine.stop()
        driver.stop()


def slow_reader(engine, tokenizer, max_new: int, max_backlog: int) -> tuple[Sequence, Collector]:
    """A sequence whose stream takes nothing until `catch_up`."""
    collector = Collector()
    seq = Sequence("slow", tokenizer(PROMPTS[1])["input_ids"], SamplingParams(ignore_eos=True), max_new, collector,
                   max_backlog=max_backlog)
    engine.submit(seq)
    return seq, collector


def catch_up(engine, seq: Sequence, collector: Collector) -> None:
    """The reader takes what is there, now and then, until the sequence ends."""
    while not collector.done.is_set():
        engine.took(seq, len(collector.chunks) - seq.taken)
        threading.Event().wait(0.01)


def test_a_sequence_whose_stream_falls_behind_pauses_and_goes_on_unchanged(tiny_model_dir):
    """Its reader stopped: the sequence stops at `max_backlog` undelivered chunks (holding its
    slot, costing no steps), its neighbour runs on, and once the reader takes what is there it
    resumes; greedy output is the same as without the pause."""
    loaded, engine = start(tiny_model_dir)
    try:
        tok = loaded.tokenizer
        seq, stalled = slow_reader(engine, tok, 40, max_backlog=4)
        other = submit(engine, tok, PROMPTS[0], SamplingParams(ignore_eos=True), 40, "other")
        wait_all([other])
        for _ in range(100):                          # a few steps more would have passed by now
            threading.Event().wait(0.01)
        assert len(stalled.chunks) == 4 and seq.paused and engine.stats().running == 1
        assert not engine.has_work(), "a paused sequence costs no steps"
        catch_up(engine, seq, stalled)
        wait_all([stalled])
        assert stalled.ids == reference(tiny_model_dir, [PROMPTS[1]], 40)[0][:40]
        assert engine.stats().running == 0
    finally:
        engine.stop()


def test_with_every_slot_paused_a_waiting_sequence_costs_no_spinning(tiny_model_dir):
    """One slot, its sequence paused, another waiting: nothing to step, so the engine has no
    work (the driver sleeps instead of looping), until the reader catches up."""
    loaded, engine = start(tiny_model_dir, slots=1)
    try:
        tok = loaded.tokenizer
        seq, stalled = slow_reader(engine, tok, 12, max_backlog=2)
        for _ in range(200):
            if seq.paused:
                break
            threading.Event().wait(0.01)
        waiting = submit(engine, tok, PROMPTS[0], SamplingParams(), 4, "next")
        threading.Event().wait(0.1)
        assert seq.paused and engine.stats().waiting == 1 and not engine.has_work()
        catch_up(engine, seq, stalled)
        wait_all([stalled, waiting])
    finally:
        engine.stop()


class _Failing:
    """A response format whose matcher gives up at the sequence's `after`-th token."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def prepare(self, pool) -> None:
        pass

    def mask(self, logits):
        return logits

    def advance(self, token: int) -> None:
        self.seen += 1
        if self.seen == self.after:
            from llmos.engine.structured import format_failed

            raise format_failed("lexer error: too many expressions constructed")

    complete = False


def test_a_sequence_whose_format_fails_ends_alone_and_the_rest_of_its_steps_go_on(tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        others = [submit(engine, loaded.tokenizer, p, params, 24, rid=f"ok-{i}") for i, p in enumerate(PROMPTS[:4])]
        failing = Collector()
        engine.submit(Sequence("bad", loaded.tokenizer("Hello")["input_ids"], params, 24, failing,
                               constraint=_Failing(after=3)))
        assert failing.done.wait(60)
        wait_all(others)
        assert failing.error.reason == "RESPONSE_FORMAT_TOO_COMPLEX" and len(failing.ids) == 2
        assert [len(c.ids) for c in others] == [24] * 4
        wait_for(lambda: engine.stats().running == 0, 10, "every slot to be free")   # (released after the last chunk)
    finally:
        engine.stop()


class OpenAiPenalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor, over the
    output only (the tokens after `prompt_len`)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prompt_len:], torch.ones_like(input_ids[:, self.prompt_len:],
                                                                               dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_presence_frequency_penalties_and_logit_bias_match_generate_with_the_same_processors(tiny_model_dir):
    """Each request beside others in one batch equals generate() with the same processors: OpenAI's
    penalties (a processor of the test's) and the logit bias (transformers' sequence bias)."""
    from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor

    loaded, engine = start(tiny_model_dir)
    tok = loaded.tokenizer
    first = [tok(text, add_special_tokens=False).input_ids[0] for text in (" the", "a", ".")]
    bias = {first[0]: 8.0, first[1]: 8.0, first[2]: -100.0}
    cases = [SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=0.8),
             SamplingParams(presence_penalty=-0.5, frequency_penalty=1.2, repetition_penalty=1.3),
             SamplingParams(logit_bias=tuple(sorted(bias.items()))),
             SamplingParams(logit_bias=tuple(sorted(bias.items())), frequency_penalty=2.0), SamplingParams()]
    try:
        runs = [submit(engine, tok, p, params, 24, f"p{i}") for i, (p, params) in enumerate(
            zip(PROMPTS[:len(cases)], cases, strict=True))]
        wait_all(runs)
    finally:
        engine.stop()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = []
    for run, prompt, params in zip(runs, PROMPTS[:len(cases)], cases, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        processors = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            processors.append(OpenAiPenalties(ids.shape[1], params.presence_penalty, params.frequency_penalty))
        if params.logit_bias:
            processors.append(SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias}))
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, logits_processor=processors,
                                 repetition_penalty=params.repetition_penalty)
            alone = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert run.ids == out[0, ids.shape[1]:].tolist(), params
        plain.append(run.ids == alone[0, ids.shape[1]:].tolist())
    assert plain[-1] and not any(plain[:-1])        # each setting changed the answer it was given


def test_a_steps_tokens_are_handed_over_as_the_next_steps_layers_begin_and_the_last_before_the_driver_waits(
        tiny_model_dir):
    loaded, engine = start(tiny_model_dir)
    events: list[tuple[str, int]] = []
    collector = Collector()
    runner, forward = loaded.runner, loaded.runner.forward

    def watched(*args, **kwargs):
        events.append(("step begins", len(collector.chunks)))
        try:
            return forward(*args, **kwargs)
        finally:
            events.append(("step ends", len(collector.chunks)))

    runner.forward = watched
    engine.driver.on_hand_over.append(lambda: events.append(("hand over", len(collector.chunks))))
    try:
        engine.submit(Sequence("r", loaded.tokenizer(PROMPTS[0])["input_ids"], SamplingParams(), 4, collector))
        wait_all([collector])
        # The last step's token before the driver waits (nothing else hands it over): seen before it stops.
        wait_for(lambda: events and events[-1] == ("hand over", 4), timeout=10)
    finally:
        engine.stop()
    events = events[events.index(("step begins", 0)):]      # (a driver just started may hand over nothing)
    # Within each step, as its layers begin, a hand-over of what the steps before it delivered, and none
    # between steps (while the next one's inputs are built)...
    assert events[:12] == [e for n in range(4) for e in (("step begins", n), ("hand over", n), ("step ends", n))]
    # ...and after the last step nothing but hand-overs of every token (stopping hands over again).
    assert events[12] == ("hand over", 4), events
    assert set(events[12:]) == {("hand over", 4)}, events


class StepLog(EngineEvents):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []     # (rows decoding, prompt tokens fed) a step

    def step(self, model, batch, prefill_tokens, kv_used, kv_capacity, start_ns, end_ns) -> None:
        self.steps.append((sum(not s.prefilling for s in batch), prefill_tokens))


@pytest.mark.parametrize("step_tokens", [32, 0], ids=["shared", "one-step"])
def test_prompts_that_arrive_together_are_fed_a_share_a_step_with_the_same_tokens(tiny_model_dir, step_tokens):
    """On a CPU (`step_tokens` 32, the default there) sixteen prompts that wait together are fed
    about sqrt(32 x what waits) tokens a step, whole, so the first fed get their first token before
    the last are fed; with 0 every step feeds the budget. The tokens are the same either way."""
    loaded = load_model("m", str(tiny_model_dir), ENGINE_DEVICE, torch.float32, 16 * 512, 512, compile=False)
    driver, log = EngineDriver(), StepLog()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, log, step_tokens=step_tokens)
    assert Engine("d", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver).step_tokens == \
        (32 if ENGINE_DEVICE.type == "cpu" else 0)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(16)]
    lengths = [len(loaded.tokenizer(p)["input_ids"]) for p in prompts]
    # All sixteen wait before the driver runs its first step.
    runs = [submit(engine, loaded.tokenizer, p, SamplingParams(), 6, f"w{i}") for i, p in enumerate(prompts)]
    driver.start_thread()
    try:
        wait_all(runs)
    finally:
        engine.stop()
        driver.stop()
    fed = [tokens for _, tokens in log.steps if tokens]
    assert sum(fed) == sum(lengths)
    if step_tokens:
        # The first step: the whole prompts, in arrival order, that fit in isqrt(32 x what waits).
        share = math.isqrt(32 * sum(lengths))
        assert fed[0] == max(total for total in itertools.accumulate(lengths) if total <= share)
        assert len(fed) >= 3
    else:
        assert fed == [sum(lengths)]
    assert [r.ids for r in runs] == reference(tiny_model_dir, prompts, 6)
