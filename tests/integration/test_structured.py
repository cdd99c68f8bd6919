"""Structured output: a response format (JSON Schema, any JSON object, regex, Lark or GBNF grammar)
constrains every sampled token, so what comes out parses and matches; the stream ends with STOP
when the structure is complete, LENGTH when `max_tokens` runs out first; requests without a
format in the same batch are untouched; a format that does not compile is refused with the
field and the compiler's message before anything runs."""

from __future__ import annotations

import json
import random
import re

import grpc
import jsonschema
import pytest
import torch

from llmos.common.domain import FinishReason, FormatKind, ResponseFormat, SamplingParams
from llmos.engine import Engine, EngineDriver, Sequence
from llmos.engine.loader import load_model
from llmos.engine.structured import Grammars
from llmos.v1 import common_pb2, gateway_pb2
from tests.integration.test_engine import Collector, Running, reference, wait_all
from tests.integration.test_generate import error_info
from tests.support.device import ENGINE_DEVICE

# Value kinds whose every instance is short, so even a random model's output ends.
BOUNDED = [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": -50, "maximum": 999},
           {"type": "boolean"}, {"enum": ["red", "green", "blue"]}, {"type": "null"},
           {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
           {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "y": {"enum": ["a", "b"]}},
            "required": ["x", "y"], "additionalProperties": False}]
NAMES = ["name", "age", "city", "color", "tags", "point", "ok", "count", "id"]


def schemas(n: int, seed: int = 0) -> list[dict]:
    """`n` different object schemas: nested objects, enums, arrays, required and optional fields."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        props = {f"{rng.choice(NAMES)}{i}": rng.choice(BOUNDED) for i in range(rng.randint(1, 4))}
        required = [k for k in props if rng.random() < 0.8]
        schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        if schema not in out:
            out.append(schema)
    return out


def start(path, slots=16):
    loaded = load_model("m", str(path), ENGINE_DEVICE, torch.float32, slots * 512, 512)
    driver = EngineDriver()
    driver.start_thread()
    engine = Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 256, max_running=slots)
    return loaded, Running(engine, driver), Grammars(loaded.tokenizer, loaded.runner.vocab_size, loaded.eos_ids)


def submit(engine, grammars, ids, fmt=None, max_new=96, rid="r", params=SamplingParams()) -> Collector:
    run = Collector()
    engine.submit(Sequence(rid, list(ids), params, max_new, run,
                           constraint=grammars.constraint(fmt) if fmt else None))
    return run


def text_of(run: Collector) -> str:
    return "".join(c.text for c in run.chunks)


def test_json_schemas_in_one_batch_all_parse_and_free_text_beside_them_is_unchanged(tiny_model_dir):
    loaded, engine, grammars = start(tiny_model_dir)
    free = ["The capital of France is", "Once upon a time", "numbers 0123", "llmos streams tokens"]
    expected = reference(tiny_model_dir, free, 16)
    try:
        tok = loaded.tokenizer
        cases = schemas(12)
        runs = [submit(engine, grammars, tok("JSON:")["input_ids"],
                       ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(s)), rid=f"s{i}") for i, s in enumerate(cases)]
        runs.append(submit(engine, grammars, tok("Any object:")["input_ids"], ResponseFormat(FormatKind.JSON_OBJECT),
                           rid="object", max_new=200))
        plain = [submit(engine, grammars, tok(p)["input_ids"], max_new=16, rid=f"free{i}",
                        params=SamplingParams(ignore_eos=True)) for i, p in enumerate(free)]
        wait_all(runs + plain)
        for schema, run in zip(cases, runs, strict=False):
            assert run.chunks[-1].finish_reason is FinishReason.STOP, text_of(run)
            jsonschema.validate(json.loads(text_of(run)), schema)
        anything = runs[-1]                 # any object: complete, or cut by its budget of 200 tokens
        assert text_of(anything).startswith("{")
        if anything.chunks[-1].finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(text_of(anything)), dict)
        else:
            assert len(anything.ids) == 200
        assert [r.ids for r in plain] == expected
    finally:
        engine.stop()


GRAMMARS = [
    (FormatKind.REGEX, r"(cat|dog)s? [0-9]{1,3}", r"(cat|dog)s? [0-9]{1,3}"),
    (FormatKind.LARK, 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{2,6}/',
     r"(hello|hi) [a-z]{2,6}"),
    (FormatKind.GBNF, 'root ::= "(" digit digit? ")"\ndigit ::= [0-9]', r"\([0-9][0-9]?\)"),
]


@pytest.mark.parametrize(("kind", "spec", "pattern"), GRAMMARS)
def test_regex_and_grammar_outputs_match_whole(tiny_model_dir, kind, spec, pattern):
    loaded, engine, grammars = start(tiny_model_dir, slots=4)
    try:
        ids = loaded.tokenizer("Answer:")["input_ids"]
        runs = [submit(engine, grammars, ids, ResponseFormat(kind, spec), rid=f"g{i}",
                       params=SamplingParams(temperature=1.0, seed=i)) for i in range(4)]
        wait_all(runs)
        for run in runs:
            assert run.chunks[-1].finish_reason is FinishReason.STOP
            assert re.fullmatch(pattern, text_of(run)), text_of(run)
    finally:
        engine.stop()


def test_a_structure_cut_short_by_max_tokens_ends_with_length(tiny_model_dir):
    loaded, engine, grammars = start(tiny_model_dir, slots=2)
    try:
        fmt = ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(
            {"type": "object", "properties": {"story": {"type": "string", "minLength": 40}}, "required": ["story"]}))
        run = submit(engine, grammars, loaded.tokenizer("JSON:")["input_ids"], fmt, max_new=4)
        wait_all([run])
        assert run.chunks[-1].finish_reason is FinishReason.LENGTH and len(run.ids) == 4
        with pytest.raises(json.JSONDecodeError):
            json.loads(text_of(run))
    finally:
        engine.stop()


@pytest.mark.smollm2
def test_smollm2_answers_fifty_different_json_schemas_and_the_grammars_all_valid(smollm2_dir):
    loaded, engine, grammars = start(smollm2_dir)
    tok = loaded.tokenizer

    def chat(question: str) -> list[int]:
        ask = [{"role": "user", "content": question}]
        return tok(tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=False))["input_ids"]
    cases = schemas(50, seed=1)
    try:
        runs = [submit(engine, grammars, chat(f"Describe item {i} as JSON."),
                       ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(schema)), rid=f"s{i}", max_new=160)
                for i, schema in enumerate(cases)]
        pets = chat("Name a pet and a number, or greet someone.")
        shaped = [submit(engine, grammars, pets, ResponseFormat(kind, spec), rid=f"g{i}{seed}",
                         params=SamplingParams(temperature=0.8, seed=seed), max_new=24)
                  for i, (kind, spec, _) in enumerate(GRAMMARS) for seed in range(2)]
        wait_all(runs + shaped, timeout=600)
        for schema, run in zip(cases, runs, strict=True):
            assert run.chunks[-1].finish_reason is FinishReason.STOP, text_of(run)
            jsonschema.validate(json.loads(text_of(run)), schema)
        for (_, _, pattern), run in zip([g for g in GRAMMARS for _ in range(2)], shaped, strict=True):
            assert run.chunks[-1].finish_reason is FinishReason.STOP
            assert re.fullmatch(pattern, text_of(run)), text_of(run)
    finally:
        engine.stop()


def formatted(**fmt) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(model="tiny", prompt="JSON:", sampling=common_pb2.SamplingParams(
        max_tokens=40, response_format=common_pb2.ResponseFormat(**fmt)))


@pytest.mark.asyncio(loop_scope="module")
async def test_through_the_suite_a_format_is_kept_and_bad_ones_are_refused_with_the_field(stack):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chunks = [c async for c in stack.gateway.Generate(formatted(json_schema=json.dumps(schema)))]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    for fields, field, says in [
            ({"regex": "([a-z"}, "sampling.response_format.regex", ""),
            ({"lark_grammar": "start: undefined_rule"}, "sampling.response_format.lark_grammar", "undefined_rule"),
            ({"gbnf_grammar": "root ::= ("}, "sampling.response_format.gbnf_grammar", "GBNF"),
            ({"json_schema": "{not json"}, "sampling.response_format.json_schema", "not valid JSON"),
            ({"json_schema": json.dumps(deep)}, "sampling.response_format.json_schema", "nested more than 32"),
            ({"json_schema": json.dumps({"type": "object", "description": "x" * 70000})},
             "sampling.response_format.json_schema", "larger than 64 KiB"),
            ({"json_schema": json.dumps({"type": "wat"})}, "sampling.response_format.json_schema", "")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [c async for c in stack.gateway.Generate(formatted(**fields))]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        violation = error_info(caught.value)["BadRequest"].field_violations[0]
        assert violation.field == field and says in violation.description and violation.description, fields
