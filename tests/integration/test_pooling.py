"""Pooling models through the whole suite: encoders and a decoder imported for embed, classify and
score, served over gRPC (`Embed`, `Classify`, `Score`) and OpenAI's and vLLM's HTTP routes, each
answer equal to the model's own transformers forward and pooling; batches equal each input alone;
calls for a task a model does not serve are refused before they are queued."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
import torch

from llmos.v1 import gateway_pb2, registry_pb2
from tests.integration.conftest import Stack
from tests.integration.test_generate import error_info
from tests.support.inprocess import start_in_process
from tests.support.metrics import admitted
from tests.support.tiny_encoders import LABELS, build_decoder_embedder, build_tiny_bert
from tests.support.tiny_model import CORPUS, build_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXTS = ["The capital of France is Paris.", "Once upon a time", "llmos streams tokens", "Café déjà vu",
         "numbers 0123456789 and more numbers"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooling-models")
    return {"bert-embed": build_tiny_bert(root / "bert-embed", "embed"),
            "bert-classify": build_tiny_bert(root / "bert-classify", "classify", seed=1),
            "bert-score": build_tiny_bert(root / "bert-score", "score", seed=2),
            "llama-embed": build_decoder_embedder(root / "llama-embed"),
            "tiny": build_tiny_model(root / "tiny")}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory, models):
    suite = await start_in_process(tmp_path_factory.mktemp("pooling"), {
        "registry": {"allowed_roots": (str(models["tiny"].parent),), "worker_dtype": "float32"},
        "worker": {"worker_id": "w1", "dtype": "float32", "register_interval_seconds": 0.2},
        "scheduler": {"slots_per_worker": 16, "max_queue": 256},
        "monitor": {"probe_interval_seconds": 0},
    })
    channels = {name: suite.channel(name) for name in suite.addresses}
    stack = Stack(suite.addresses, channels, suite.metrics, suite)
    for name, path in models.items():
        await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name=name, source=str(path)))
        await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name=name))
    yield stack
    for channel in channels.values():
        await channel.close()
    await suite.stop(grace=1.0)


def reference(path, texts, kind="embed", pairs=None, pooling="mean") -> torch.Tensor:
    """Each text alone through transformers' own model, pooled as sentence-transformers does."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = AutoModel if kind == "embed" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            inputs = tokenizer(text, pairs[i] if pairs else None, return_tensors="pt")
            out = model(**inputs)
            if kind == "classify":
                rows.append(torch.softmax(out.logits[0], dim=-1))
            elif kind == "score":
                rows.append(torch.sigmoid(out.logits[0, :1]))
            else:
                hidden = out.last_hidden_state[0]
                vector = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
                rows.append(torch.nn.functional.normalize(vector, dim=-1))
    return torch.stack(rows)


def api(stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{stack.suite.http_address}/v1", api_key=key, max_retries=0)


async def test_the_catalog_says_what_each_model_serves(stack):
    tasks = {name: (await stack.registry.GetModel(registry_pb2.GetModelRequest(name=name))).model.task
             for name in ("bert-embed", "bert-classify", "bert-score", "llama-embed", "tiny")}
    assert tasks == {"bert-embed": "embed", "bert-classify": "classify", "bert-score": "score",
                     "llama-embed": "embed", "tiny": "generate"}
    listed = await stack.gateway.ListAvailableModels(gateway_pb2.ListAvailableModelsRequest(page_size=100))
    assert {m.name: m.task for m in listed.models} == {f"{name}:latest": task for name, task in tasks.items()}


@pytest.mark.parametrize("name,pooling", [("bert-embed", "mean"), ("llama-embed", "last")])
async def test_embeddings_equal_the_models_own_forward_and_pooling(stack, models, name, pooling):
    expected = reference(models[name], TEXTS, pooling=pooling)
    key = await stack.user_key("pooling")
    answer = await api(stack, key).embeddings.create(model=name, input=TEXTS)      # (the SDK asks for base64)
    got = torch.tensor([d.embedding for d in answer.data])
    assert [d.index for d in answer.data] == list(range(len(TEXTS)))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert answer.usage.prompt_tokens > len(TEXTS) and answer.model == f"{name}:latest"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as raw:
        floats = (await raw.post(f"http://{stack.suite.http_address}/v1/embeddings",
                                 json={"model": name, "input": TEXTS[0], "encoding_format": "float"})).json()
    assert torch.allclose(torch.tensor(floats["data"][0]["embedding"]), expected[0], atol=1e-5)
    grpc_answer = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model=name, inputs=TEXTS))
    assert torch.allclose(torch.tensor([list(v.values) for v in grpc_answer.embeddings]), expected, atol=1e-5)
    # and sentence-transformers' own encode() of the same files
    from sentence_transformers import SentenceTransformer

    encoded = torch.tensor(SentenceTransformer(str(models[name]), device="cpu").encode(TEXTS, batch_size=2))
    assert torch.allclose(got, encoded, atol=1e-5), (got - encoded).abs().max()


async def test_a_batch_of_64_equals_each_input_alone(stack):
    texts = [CORPUS[i % 6][: 10 + 7 * (i % 9)] for i in range(64)]
    together = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model="bert-embed", inputs=texts))
    alone = await asyncio.gather(*(stack.gateway.Embed(gateway_pb2.EmbedRequest(model="bert-embed", inputs=[t]))
                                   for t in texts))
    got = torch.tensor([list(v.values) for v in together.embeddings])
    each = torch.tensor([list(a.embeddings[0].values) for a in alone])
    assert torch.allclose(got, each, atol=1e-5), (got - each).abs().max()
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


async def test_matryoshka_dimensions_cut_and_normalize_and_others_are_refused(stack, models):
    expected = reference(models["bert-embed"], TEXTS[:2])[:, :16]
    answer = await api(stack, await stack.user_key("pooling")).embeddings.create(
        model="bert-embed", input=TEXTS[:2], dimensions=16)
    got = torch.tensor([d.embedding for d in answer.data])
    assert torch.allclose(got, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        await api(stack, await stack.user_key("pooling")).embeddings.create(model="bert-embed", input="x",
                                                                             dimensions=20)
    assert caught.value.body["code"] == "DIMENSIONS_UNSUPPORTED"


async def test_classification_is_the_classifiers_softmax(stack, models):
    expected = reference(models["bert-classify"], TEXTS, kind="classify")
    answer = await stack.gateway.Classify(gateway_pb2.ClassifyRequest(model="bert-classify", inputs=TEXTS))
    got = torch.tensor([list(v.values) for v in answer.probabilities])
    assert torch.allclose(got, expected, atol=1e-5) and list(answer.labels) == list(LABELS.values())
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {await stack.user_key('pooling')}"}) as raw:
        body = (await raw.post(f"http://{stack.suite.http_address}/v1/classify",
                               json={"model": "bert-classify", "input": TEXTS})).json()
    assert [d["label"] for d in body["data"]] == [LABELS[int(row.argmax())] for row in expected]
    assert torch.allclose(torch.tensor([d["probs"] for d in body["data"]]), expected, atol=1e-5)


async def test_scores_and_reranking_are_the_cross_encoders_and_cosine_for_an_embedder(stack, models):
    query, documents = "Where is Paris?", TEXTS
    expected = reference(models["bert-score"], [query] * len(documents), kind="score", pairs=documents)[:, 0]
    answer = await stack.gateway.Score(gateway_pb2.ScoreRequest(model="bert-score", query=query, documents=documents))
    assert torch.allclose(torch.tensor(list(answer.scores)), expected, atol=1e-5)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {await stack.user_key('pooling')}"}) as raw:
        base = f"http://{stack.suite.http_address}/v1"
        scored = (await raw.post(f"{base}/score", json={"model": "bert-score", "text_1": query,
                                                         "text_2": documents})).json()
        ranked = (await raw.post(f"{base}/rerank", json={"model": "bert-score", "query": query, "top_n": 3,
                                                          "documents": [{"text": d} for d in documents]})).json()
        cosine = (await raw.post(f"{base}/score", json={"model": "bert-embed", "text_1": query,
                                                         "text_2": documents})).json()
    assert torch.allclose(torch.tensor([d["score"] for d in scored["data"]]), expected, atol=1e-5)
    order = sorted(range(len(documents)), key=lambda i: -float(expected[i]))[:3]
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["document"]["text"] for r in ranked["results"]] == [documents[i] for i in order]
    vectors = reference(models["bert-embed"], [query, *documents])
    assert torch.allclose(torch.tensor([d["score"] for d in cosine["data"]]), vectors[1:] @ vectors[0], atol=1e-5)


async def test_bad_pooling_calls_are_refused_before_anything_is_queued(stack):
    client = api(stack, await stack.user_key("pooling"))
    before = await admitted(stack.metrics["scheduler"])
    cases = [(dict(model="tiny", input="x"), "model", "MODEL_TASK_MISMATCH"),
             (dict(model="bert-embed", input=[]), "input", None),
             (dict(model="bert-embed", input=["x"] * 2049), "input", None),
             (dict(model="bert-embed", input=["ok", ""]), "input[1]", None)]
    for fields, param, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(**fields)
        assert caught.value.body["param"] == param and (code is None or caught.value.body["code"] == code)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="bert-embed", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "MODEL_TASK_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.Classify(gateway_pb2.ClassifyRequest(model="bert-embed", inputs=["x"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await admitted(stack.metrics["scheduler"]) == before
    # Longer than the model reads: refused, or cut when the request says so.
    long = " ".join(TEXTS * 10)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="bert-embed", input=long)
    assert caught.value.body["code"] == "INPUT_TOO_LONG"
    cut = await client.embeddings.create(model="bert-embed", input=long, extra_body={"truncate_prompt_tokens": 32})
    assert cut.usage.prompt_tokens == 32


async def test_import_takes_a_task_and_refuses_what_a_model_cannot_do(stack, models):
    made = await stack.registry.ImportModel(registry_pb2.ImportModelRequest(
        name="tiny-as-embedder", source=str(models["tiny"]), task="embed"))
    assert made.model.task == "embed" and made.model.tool_call_format == ""
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny-as-embedder"))
    vectors = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model="tiny-as-embedder", inputs=TEXTS[:2]))
    expected = reference(models["tiny"], TEXTS[:2], pooling="last")
    assert torch.allclose(torch.tensor([list(v.values) for v in vectors.embeddings]), expected, atol=1e-5)
    for name, source, task, reason in [("bert-gen", "bert-embed", "generate", "NOT_A_CAUSAL_LM"),
                                       ("bert-cls", "bert-embed", "classify", "MODEL_TASK_UNSUPPORTED")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.registry.ImportModel(registry_pb2.ImportModelRequest(
                name=name, source=str(models[source]), task=task))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value)["ErrorInfo"].reason == reason
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="x", source=str(models["tiny"]),
                                                                         task="dance"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_python_client_and_llmos_embed_give_the_same_vectors(stack, models):
    import json
    import sys

    a = stack.suite.addresses
    cli = [sys.executable, "-m", "llmos.cli", "--gateway", a["gateway"], "--registry", a["registry"],
           "--data-dir", str(stack.suite.data_dir)]
    run = await asyncio.create_subprocess_exec(*cli, "embed", "bert-embed", *TEXTS[:2],
                                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, err.decode()
    printed = torch.tensor([json.loads(line) for line in out.decode().splitlines()])
    assert torch.allclose(printed, reference(models["bert-embed"], TEXTS[:2]), atol=1e-5)
    assert "2 vectors of 64" in err.decode()

    from llmos_client.aio import AsyncClient

    async with AsyncClient(a["gateway"], a["registry"], api_key=await stack.user_key("pooling")) as client:
        response = await client.embed("bert-embed", TEXTS[:2])
    assert torch.allclose(torch.tensor([list(v.values) for v in response.embeddings]), printed, atol=1e-6)
