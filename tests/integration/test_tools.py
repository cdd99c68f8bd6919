"""Tool calling through the whole suite, driven by unmodified clients (the `openai` SDK, LangChain)
and the gRPC door: a model that calls a tool of its own accord runs the two-turn loop with every
tool choice, streamed and whole; a tiny random model forced to call tools emits only calls that
parse and validate against their schemas; bad tools are refused before anything is queued."""

from __future__ import annotations

import asyncio
import json
import random
import sys

import grpc
import jsonschema
import openai
import pytest
import pytest_asyncio

from llmos.v1 import common_pb2, gateway_pb2, registry_pb2
from tests.integration.conftest import Stack
from tests.support.inprocess import start_in_process
from tests.support.metrics import admitted
from tests.support.tiny_model import build_tiny_model
from tests.support.tool_model import ANSWER, ARGUMENTS, QUESTION, RESULT, WEATHER, build_tool_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

ASK = [{"role": "user", "content": QUESTION}]
CHOICES = {"auto": "auto", "required": "required", "named": {"type": "function", "function": {"name": "get_weather"}}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory):
    models = tmp_path_factory.mktemp("tool-models")
    build_tool_model(models / "weather")
    build_tiny_model(models / "tiny4k", context=4096)
    suite = await start_in_process(tmp_path_factory.mktemp("tools"), {
        "registry": {"allowed_roots": (str(models),), "worker_dtype": "float32"},
        "worker": {"worker_id": "w1", "dtype": "float32", "register_interval_seconds": 0.2},
        "scheduler": {"slots_per_worker": 16, "max_queue": 256},
        "monitor": {"probe_interval_seconds": 0},
    })
    channels = {name: suite.channel(name) for name in suite.addresses}
    stack = Stack(suite.addresses, channels, suite.metrics, suite)
    for name in ("weather", "tiny4k"):
        await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name=name, source=str(models / name)))
        await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name=name))
    yield stack
    for channel in channels.values():
        await channel.close()
    await suite.stop(grace=1.0)


def client(stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{stack.suite.http_address}/v1", api_key=key, max_retries=0)


async def ask(api: openai.AsyncOpenAI, stream: bool, **fields) -> tuple[str | None, list[dict], str]:
    """(content, tool calls as OpenAI's dicts, finish reason) of one chat completion, a stream's
    deltas put together as the SDK's users do."""
    if not stream:
        answer = await api.chat.completions.create(model="weather", temperature=0, max_tokens=96, **fields)
        message = answer.choices[0].message
        calls = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls or []]
        return message.content, calls, answer.choices[0].finish_reason
    content, calls, finish = "", {}, None
    async for chunk in await api.chat.completions.create(model="weather", temperature=0, max_tokens=96, stream=True,
                                                         **fields):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = delta.id or call["id"]
            call["function"]["name"] += delta.function.name or ""
            call["function"]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", list(CHOICES))
async def test_the_openai_sdk_runs_a_two_turn_tool_loop(stack, choice, stream):
    api = client(stack, await stack.user_key("tools"))
    content, calls, finish = await ask(api, stream, messages=ASK, tools=[WEATHER], tool_choice=CHOICES[choice])
    assert finish == "tool_calls" and not content, (content, calls)
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    arguments = json.loads(calls[0]["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert arguments == ARGUMENTS and calls[0]["id"].startswith("call_")
    answered = ASK + [{"role": "assistant", "content": None, "tool_calls": calls},
                      {"role": "tool", "tool_call_id": calls[0]["id"], "content": RESULT}]
    content, calls, finish = await ask(api, stream, messages=answered, tools=[WEATHER], tool_choice="auto")
    assert (content, calls, finish) == (ANSWER, [], "stop")


async def test_langchain_bind_tools_gets_tool_calls_whose_arguments_validate(stack):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="weather", base_url=f"http://{stack.suite.http_address}/v1", max_retries=0,
                      api_key=await stack.user_key("tools"), temperature=0, max_tokens=96)
    message = await chat.bind_tools([WEATHER]).ainvoke(QUESTION)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", ARGUMENTS)]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])


async def test_the_grpc_door_streams_tool_calls_and_ends_with_tool_calls(stack):
    f = WEATHER["function"]
    request = gateway_pb2.GenerateRequest(
        model="weather", messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
        tools=[common_pb2.Tool(name=f["name"], description=f["description"], parameters=json.dumps(f["parameters"]))],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.ToolChoice.MODE_REQUIRED),
        sampling=common_pb2.SamplingParams(max_tokens=96))
    chunks = [c async for c in stack.gateway.Generate(request)]
    calls = [c for chunk in chunks for c in chunk.tool_calls]
    assert "".join(c.text for c in chunks) == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGUMENTS)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    shown = await stack.registry.GetModel(registry_pb2.GetModelRequest(name="weather"))
    assert shown.model.tool_call_format == "hermes"       # a template without tools: llmos's own prompt


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An arguments schema whose every value is bounded (so a call fits in a few hundred tokens)."""
    def value(level: int) -> dict:
        kind = rng.choice(["string", "enum", "integer", "boolean", "array"] + ["object"] * (level < 1))
        if kind == "string":
            return {"type": "string", "maxLength": rng.randint(1, 8)}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "north", "south", 1, 2, True], rng.randint(1, 4))}
        if kind == "integer":
            low = rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "array":
            return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "maxItems": rng.randint(0, 3)}
        return random_schema(rng, level + 1)
    names = rng.sample(["city", "count", "unit", "when", "flag", "tags", "level", "mode", "x", "y"], rng.randint(1, 4))
    properties = {name: value(depth) for name in names}
    return {"type": "object", "properties": properties, "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False}


async def test_two_hundred_forced_calls_with_random_schemas_all_parse_and_validate(stack):
    """A random model cannot mean anything: what holds is the grammar. With `required` (half of
    them one call only, half as many as it likes) every call names one of the request's tools and
    its arguments validate against that tool's schema."""
    api = openai.AsyncOpenAI(base_url=f"http://{stack.suite.http_address}/v1",
                             api_key=await stack.user_key("tools"), max_retries=0, timeout=300)
    rng = random.Random(2026)
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[dict, list, str]:
        tools = {f"fn_{i}_{k}": random_schema(rng) for k in range(rng.randint(1, 3))}
        async with gate:
            answer = await api.chat.completions.create(
                model="tiny4k", messages=[{"role": "user", "content": f"Call something ({i})."}], temperature=1.0,
                seed=i, max_tokens=400, tool_choice="required", parallel_tool_calls=i % 2 == 1,
                tools=[{"type": "function", "function": {"name": n, "parameters": s}} for n, s in tools.items()])
        return tools, answer.choices[0].message.tool_calls or [], answer.choices[0].finish_reason

    results = await asyncio.gather(*(one(i) for i in range(200)))
    checked = 0
    for i, (tools, calls, finish) in enumerate(results):
        assert calls, (i, finish)
        if i % 2 == 0:                      # one call only: it ends the answer
            assert finish == "tool_calls" and len(calls) == 1, (i, finish, calls)
        for call in calls:
            assert call.function.name in tools
            jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])
            checked += 1
    assert checked >= 200


async def test_bad_tools_are_refused_before_anything_is_queued(stack):
    api = client(stack, await stack.user_key("tools"))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nope"}}}}}]}, "tools[0].parameters"),
        ({"tools": [tool] * 129}, "tools"),
        ({"tools": [tool, tool]}, "tools[1].name"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].name"),
        ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"tools": [tool], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [tool], "response_format": {"type": "json_object"}}, "tools"),
        ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "42"}]}, "messages[1].tool_call_id"),
        ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
         "messages[1].tool_calls[0].arguments"),
    ]
    before = await admitted(stack.metrics["scheduler"])
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(model="weather", **({"messages": ASK} | fields))
        assert caught.value.body["param"] == param, (fields, caught.value.body)
    assert await admitted(stack.metrics["scheduler"]) == before
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.Generate(gateway_pb2.GenerateRequest(
            model="weather", prompt="x", tools=[common_pb2.Tool(name="f")])).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools" in caught.value.details()


async def test_llmos_chat_with_tools_prints_the_call_reads_its_result_and_answers(stack, tmp_path):
    """`llmos chat --tools FILE`: the model's call is printed, the next line is its result, and the
    model answers with it; `llmos models show` names the model's tool-call format."""
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    a = stack.suite.addresses
    cli = [sys.executable, "-m", "llmos.cli", "--gateway", a["gateway"], "--registry", a["registry"],
           "--data-dir", str(stack.suite.data_dir)]
    chat = await asyncio.create_subprocess_exec(
        *cli, "chat", "weather", "--tools", str(tmp_path / "tools.json"), "--max-tokens", "96",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(chat.communicate(f"{QUESTION}\n{RESULT}\n".encode()), 120)
    assert chat.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert f"[call get_weather({json.dumps(ARGUMENTS)})]" in lines and ANSWER in lines, out.decode()
    show = await asyncio.create_subprocess_exec(*cli, "models", "show", "weather", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(show.communicate(), 60)
    assert show.returncode == 0 and "tool calls hermes" in out.decode(), (out, err)
