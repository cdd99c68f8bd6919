"""The gateway's HTTP door in OpenAI's API, driven by the real `openai` SDK (and raw HTTP where the
SDK would hide what is on the wire), against the whole suite: the same answers as the gRPC door,
the same keys, errors in OpenAI's shape, and a closed connection cancels its generation."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio

from llmos.common import authz
from llmos.common.auth import Authenticator, Guard
from llmos.common.errors import PermissionDenied
from llmos.v1 import common_pb2, gateway_pb2, identity_pb2, registry_pb2, scheduler_pb2, worker_pb2
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = [{"role": "user", "content": "Name a river."}]


def client(stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{stack.suite.http_address}/v1", api_key=key, max_retries=0)


async def grpc_answer(stack, **fields) -> tuple[str, list[float], common_pb2.Usage]:
    sampling = common_pb2.SamplingParams(max_tokens=fields.pop("max_tokens"), logprobs=True)
    chunks = [c async for c in stack.gateway.Generate(gateway_pb2.GenerateRequest(model="tiny", sampling=sampling,
                                                                                   **fields))]
    return "".join(c.text for c in chunks), [p for c in chunks for p in c.logprobs], chunks[-1].usage


async def test_a_streamed_chat_completion_is_the_grpc_doors_answer(stack):
    key = await stack.user_key("http")
    text, logprobs, usage = await grpc_answer(stack, messages=[common_pb2.ChatMessage(**QUESTION[0])], max_tokens=12)
    stream = await client(stack, key).chat.completions.create(
        model="tiny", messages=QUESTION, max_completion_tokens=12, temperature=0, stream=True, logprobs=True,
        top_logprobs=2, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == "length"
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx(logprobs)
    assert all(len(e.top_logprobs) == 2 for e in entries)
    # Tokens named by their text, as the model's tokenizer decodes each alone, with their bytes.
    sampling = common_pb2.SamplingParams(max_tokens=12, logprobs=True)
    named = [t async for c in stack.gateway.Generate(gateway_pb2.GenerateRequest(
        model="tiny", sampling=sampling, messages=[common_pb2.ChatMessage(**QUESTION[0])])) for t in c.tokens]
    assert [e.token for e in entries] == named and "".join(named) == text
    assert all(e.bytes == list(e.token.encode()) for e in entries if "\ufffd" not in e.token)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_completions_whole_and_streamed_and_the_model_list(stack):
    key = await stack.user_key("http")
    api = client(stack, key)
    text, _, _ = await grpc_answer(stack, prompt="The capital of France is", max_tokens=8)
    whole = await api.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.object == "text_completion"
    streamed = [c async for c in await api.completions.create(model="tiny:latest", prompt="The capital of France is",
                                                               max_tokens=8, temperature=0, stream=True)]
    assert "".join(c.choices[0].text for c in streamed) == text
    chat = await api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0.8, seed=7)
    again = await api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0.8, seed=7)
    assert chat.choices[0].message.content == again.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    models = await api.models.list()
    assert "tiny:latest" in [m.id for m in models.data]


async def test_a_json_schema_completion_parses_and_matches(stack):
    api = client(stack, await stack.user_key("http"))
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 12},
                                               "long": {"type": "boolean"}},
              "required": ["river", "long"], "additionalProperties": False}
    answer = await api.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=60, temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "river", "schema": schema, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    streamed = [c async for c in await api.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=100, stream=True, response_format={"type": "json_object"})]
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text.startswith("{")                 # an object, complete or cut at max_tokens
    if streamed[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert streamed[-1].choices[0].finish_reason == "length"


async def test_a_stop_string_ends_the_text_before_it(stack):
    api = client(stack, await stack.user_key("http"))
    full = await api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = full.choices[0].text
    cut = next((text[:i] for i in range(3, len(text)) if text[i].strip() and text[:i].strip()), None)
    if cut is None:
        pytest.skip("the tiny model's answer has no place to cut")
    stop = text[len(cut):len(cut) + 2]
    stopped = await api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                           stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


async def test_keys_refusals_and_unsupported_fields_are_openai_errors(stack):
    base = f"http://{stack.suite.http_address}/v1"
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(stack, "llmos-nope.nope").chat.completions.create(model="tiny", messages=QUESTION)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "API_KEY_INVALID"
    key = await stack.user_key("http")
    api = client(stack, key)
    with pytest.raises(openai.NotFoundError) as caught:
        await api.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert caught.value.body["type"] == "not_found_error"
    listed = {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}
    for fields, param in [({"n": 17}, "n"), (listed, "tools[0].function.parameters"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
                           "response_format"),
                          ({"temperature": 7}, "temperature"), ({"frequency_penalty": 5}, "frequency_penalty"),
                          ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {"100000": 1}}, "logit_bias"), ({"n": 0}, "n")]:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(model="tiny", messages=QUESTION, **fields)
        assert caught.value.body["param"] == param, (fields, caught.value.body)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        await api.chat.completions.create(model="tiny", messages=image)
    assert caught.value.body["param"] == "messages[0].content[0]"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as raw:
        bad = await raw.post(f"{base}/chat/completions", content=b'{"model": "tiny", "messages": [')
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        missing = await raw.post(f"{base}/chat/completions", content=b"{}", headers={"Authorization": ""})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "API_KEY_MISSING"
        huge = await raw.post(f"{base}/completions", content=b" " * (5 * 1024 * 1024))
        assert huge.status_code == 413
    # The SSE stream on the wire, as `curl -N` shows it (the suite runs on this event loop: curl
    # runs beside it).
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sSNi", f"{base}/chat/completions", "-H", f"Authorization: Bearer {key}",
        "-d", json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 3, "stream": True}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await curl.communicate()
    assert curl.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    lines = [line for line in body.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def long_model(stack, tiny_model_dir) -> str:
    """A tiny model of a long context, loaded: the stack's serves 256 tokens, generated in well under
    a second (and sent in a few merged chunks to a reader that waits), so a generation of it may end
    before the test's next call; 2,000 tokens of this one are still running then."""
    long = build_tiny_model(tiny_model_dir.parent / "tiny-long", seed=1, context=2048)
    await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny-long", source=str(long)))
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny-long"))
    return "tiny-long"


async def test_a_quota_refusal_is_429_with_retry_after(stack, long_model):
    key = await stack.user_key("http-solo", quota=identity_pb2.TenantQuota(max_concurrent_requests=1))
    base = f"http://{stack.suite.http_address}/v1"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as raw:
        # (ignore_eos: a random model may end its answer at once, freeing the slot before the second call)
        body = {"model": long_model, "prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        async with raw.stream("POST", f"{base}/completions", json=body) as first:
            # (the lines' iterator held: one dropped is closed at the loop's next turn, and the response
            # with it, which ended the generation before the second call now and then)
            lines = first.aiter_lines()
            await anext(lines)                          # running: the tenant's one slot is taken
            refused = await raw.post(f"{base}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            await lines.aclose()
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert refused.json()["error"]["type"] == "rate_limit_error"


async def eventually(check, tries=600):
    """Polls `check()` (a coroutine function) until it returns something true; returns the last."""
    for _ in range(tries):
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    return value


async def test_a_closed_connection_cancels_the_generation_and_frees_its_slot(stack, long_model):
    """On the long model, so the generation is still running when the client leaves."""
    key = await stack.user_key("http")
    base = f"http://{stack.suite.http_address}/v1"
    done = scheduler_pb2.GetRequestStatusResponse.STATE_DONE

    for stream in (True, False):
        request_id = f"http-closed-{stream}"

        async def status(rid=request_id):
            return await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id=rid))

        async def running():
            try:
                return (await status()).state == scheduler_pb2.GetRequestStatusResponse.STATE_RUNNING
            except grpc.aio.AioRpcError as exc:        # not arrived yet
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False

        async def ended():
            return (await status()).state == done

        async def off_the_worker(rid=request_id):
            return rid not in (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).request_ids

        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id}) as raw:
            body = {"model": long_model, "prompt": "Once", "max_tokens": 1000, "stream": stream, "ignore_eos": True}
            task = asyncio.ensure_future(raw.post(f"{base}/completions", json=body))
            assert await eventually(running), task.done() and task.result().text      # generating on the worker
            task.cancel()                                  # the client goes away mid-generation
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await eventually(ended)
        assert (await status()).reason == "CANCELLED", (stream, await status())
        assert await eventually(off_the_worker)


async def test_every_http_route_has_a_rule_and_one_without_is_refused():
    from llmos.gateway.openai_api import OpenAiDoor

    door = OpenAiDoor("127.0.0.1:0", None, None, None, None, None)
    routes = {f"{method} {route.path}" for route in door.app.routes for method in route.methods - {"HEAD"}}
    assert routes == set(authz.HTTP_TABLE)
    guard = Guard(Authenticator(None))
    with pytest.raises(PermissionDenied) as caught:
        guard.check_key("POST /v1/audio/transcriptions", "Bearer llmos-a.b")
    assert caught.value.reason == "METHOD_NOT_ALLOWED"


async def test_n_choices_are_each_the_request_with_its_documented_seed(stack):
    """`n`=4 with a seed: four choices, choice i the same request alone with seed + i; streamed,
    the choices' deltas interleave by index and put together give the same texts."""
    api = client(stack, await stack.user_key("http"))
    fields = dict(model="tiny", messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.95)
    answer = await api.chat.completions.create(n=4, seed=41, **fields)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    alone = [await api.chat.completions.create(seed=41 + i, **fields) for i in range(4)]
    assert [c.message.content for c in answer.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in answer.choices}) > 1          # four draws, not one four times
    assert answer.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert answer.usage.prompt_tokens == alone[0].usage.prompt_tokens
    texts = ["", "", "", ""]
    async for chunk in await api.chat.completions.create(n=4, seed=41, stream=True, **fields):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in answer.choices]
    completions = await api.completions.create(model="tiny", prompt="Once upon a time", n=3, seed=5, max_tokens=6,
                                               temperature=1.0)
    assert [c.index for c in completions.choices] == [0, 1, 2] and completions.usage.completion_tokens == 18


async def test_the_other_choices_of_n_take_the_first_ones_prompt_from_the_prefix_cache(stack):
    """The choices after the first start once it has its prompt in the cache: their prompt's full
    blocks are found there, not computed again."""
    from tests.support.metrics import sample_sum, scrape

    prompt = "A fresh prompt for choices: " + " ".join(f"w{i}" for i in range(30))
    before = sample_sum(await asyncio.to_thread(scrape, stack.metrics["worker"]), "llmos_prefix_cache_hits_total")
    answer = await client(stack, await stack.user_key("http")).completions.create(
        model="tiny", prompt=prompt, n=4, max_tokens=4, temperature=1.0, seed=3)
    after = sample_sum(await asyncio.to_thread(scrape, stack.metrics["worker"]), "llmos_prefix_cache_hits_total")
    blocks = answer.usage.prompt_tokens // 16 * 16          # (the cache shares whole blocks of 16 positions)
    assert len(answer.choices) == 4 and blocks >= 32
    assert after - before >= 3 * (blocks - 16), (before, after, answer.usage.prompt_tokens)
