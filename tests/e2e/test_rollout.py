"""Updating a model without downtime: an alias flipped under load, a canary split, a failed flip
and the input a change refuses; and fine-tunes: LoRA adapters made by PEFT, served over their
base beside it, and those the engine cannot serve refused at import. Versions of the tiny model
made from different seeds, so their greedy answers differ; one suite, tests in file order.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from llmos_client import errors

from llmos.cli.launcher import SERVICES, Suite
from llmos.v1 import common_pb2, registry_pb2
from tests.support.lora import adapter_of, peft_greedy, save_adapter
from tests.support.metrics import sample_sum, scrape
from tests.support.suites import quiet_env
from tests.support.tiny_model import build_tiny_model

PROMPT = "the cat sat on"
ANSWER_TOKENS = 12


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {tag: build_tiny_model(root / tag, seed=seed) for tag, seed in (("v1", 0), ("v2", 1), ("v3", 2))}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, versions):
    data = tmp_path_factory.mktemp("rollout")
    suite = Suite(data, ports={s: 0 for s in SERVICES}, metrics_port=0, workers=1,
                  env=quiet_env(next(iter(versions.values())).parent, LLMOS_WORKER_REGISTER_INTERVAL_SECONDS="1",
                                LLMOS_REGISTRY_MAX_ADAPTER_RANK="16",
                                # PEFT's reference runs float32: so does the worker, on any CPU.
                                LLMOS_WORKER_DTYPE="float32", LLMOS_REGISTRY_WORKER_DTYPE="float32"))
    suite.start(timeout=120)
    try:
        with suite.client() as client:
            for tag, path in versions.items():
                client.import_model("tiny", str(path), tag=tag)
        yield suite
    finally:
        suite.stop()


def answer(client, model: str, conversation: str = "", max_tokens: int = ANSWER_TOKENS) -> tuple[str, str]:
    """(the version that answered, the whole greedy answer)."""
    version, text = "", ""
    for response in client.generate(model, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True,
                                    conversation_id=conversation, timeout=60):
        version = version or response.model
        text += response.text
    return version, text


class Watch:
    """Every WatchModels event from now on, as (model, kind name, reason), in a thread."""

    def __init__(self, client) -> None:
        self.events: list[tuple[str, str, str]] = []
        self._stream = client.registry.WatchModels(registry_pb2.WatchModelsRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for e in self._stream:
                self.events.append((e.model, registry_pb2.WatchModelsResponse.Kind.Name(e.kind), e.reason))
        except grpc.RpcError:
            pass

    def wait_for(self, model: str, kind: str, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (m, k, _) in enumerate(self.events):
                if m == model and k == kind:
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no {kind} for {model} in {self.events}")

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5)


def state(client, model: str) -> str:
    return common_pb2.Model.State.Name(client.get_model(model).state)


def test_a_flip_under_16_streams_loses_none_and_sends_every_later_request_to_v2(suite):
    with suite.client() as client:
        created = client.set_alias("chat", "tiny:v1")
        assert created.changed and state(client, "tiny:v1") == "STATE_READY"
        assert state(client, "tiny:v2") == "STATE_AVAILABLE"       # nothing loads v2 before the flip
        v1_version, v1_answer = answer(client, "chat")
        assert v1_version == "tiny:v1"
        held, release = threading.Barrier(17), threading.Event()

        def stream_on_v1(i: int) -> tuple[str, str]:
            stream = client.generate("chat", prompt=PROMPT, max_tokens=200, ignore_eos=True, timeout=120,
                                     conversation_id=f"held-{i}")
            first = next(stream)
            held.wait(timeout=60)
            release.wait(timeout=120)           # in flight, its worker paused by the unread backlog
            return first.model, first.text + "".join(r.text for r in stream)

        watch = Watch(client)
        with ThreadPoolExecutor(16) as pool:
            streams = [pool.submit(stream_on_v1, i) for i in range(16)]
            held.wait(timeout=60)               # all 16 have their first token from v1
            flipped = client.set_alias("chat", "tiny:v2")
            assert flipped.changed and [t.model for t in flipped.alias.previous_targets] == ["tiny:v1"]
            after = [answer(client, "chat", f"after-{i}") for i in range(4)]
            assert state(client, "tiny:v1") == "STATE_READY", "v1 was unloaded while its streams ran"
            watch.wait_for("tiny:v1", "KIND_DRAINING")
            release.set()
            results = [s.result(timeout=120) for s in streams]
        assert all(version == "tiny:v1" for version, _ in results)
        assert all(text.startswith(v1_answer) for _, text in results), "a stream in flight did not finish on v1"
        v2_direct = answer(client, "tiny:v2")
        assert v2_direct[1] != v1_answer, "the two versions answer alike: the test could not tell them apart"
        assert after == [("tiny:v2", v2_direct[1])] * 4
        unloaded = watch.wait_for("tiny:v1", "KIND_UNLOADED")
        assert watch.wait_for("chat:latest", "KIND_ALIAS_SET") < watch.wait_for("tiny:v1", "KIND_DRAINING") \
            < watch.wait_for("tiny:v1", "KIND_DRAINED") < unloaded
        assert state(client, "tiny:v1") == "STATE_AVAILABLE" and state(client, "tiny:v2") == "STATE_READY"
        watch.close()


def test_a_rollback_is_the_same_flip_back_and_says_so(suite):
    with suite.client() as client:
        watch = Watch(client)
        previous = [t.model for t in client.get_alias("chat").previous_targets]
        back = client.set_alias("chat", {m: 100 for m in previous}, rollback_window=30)
        assert back.changed and [t.model for t in back.alias.targets] == ["tiny:v1"]
        assert answer(client, "chat")[0] == "tiny:v1"
        watch.wait_for("chat:latest", "KIND_ROLLED_BACK")
        drained = watch.events[watch.wait_for("tiny:v2", "KIND_DRAINED")]
        assert "kept loaded 30s" in drained[2]
        assert state(client, "tiny:v2") == "STATE_READY", "kept warm for the rollback window"
        assert not client.set_alias("chat", "tiny:v1").changed
        watch.close()


def test_a_canary_80_20_over_500_conversations_lands_near_20_and_sticks(suite):
    with suite.client() as client:
        client.set_alias("chat", {"tiny:v1": 80, "tiny:v2": 20})
        before = scrape(suite.metrics["gateway"])

        def version_of(conversation: str) -> str:
            return answer(client, "chat", conversation, max_tokens=1)[0]

        with ThreadPoolExecutor(16) as pool:
            first = list(pool.map(version_of, [f"conv-{i}" for i in range(500)]))
            again = list(pool.map(version_of, [f"conv-{i}" for i in range(0, 500, 5)]))
        counts = Counter(first)
        assert set(counts) == {"tiny:v1", "tiny:v2"}
        assert abs(counts["tiny:v2"] / 500 - 0.20) <= 0.05, counts
        assert again == first[::5], "a conversation changed versions while the split stood"
        after = scrape(suite.metrics["gateway"])
        for version in ("tiny:v1", "tiny:v2"):
            served = sample_sum(after, "llmos_gateway_requests_total", model_name="chat",
                                model_version=version, code="OK") - sample_sum(
                before, "llmos_gateway_requests_total", model_name="chat", model_version=version, code="OK")
            assert served == counts[version] + again.count(version), version
        # Growing v2's share only moves conversations to v2.
        client.set_alias("chat", {"tiny:v1": 50, "tiny:v2": 50})
        with ThreadPoolExecutor(16) as pool:
            grown = list(pool.map(version_of, [f"conv-{i}" for i in range(0, 500, 5)]))
        assert all(g == "tiny:v2" for f, g in zip(first[::5], grown, strict=True) if f == "tiny:v2")
        assert grown.count("tiny:v2") > again.count("tiny:v2")


def test_a_flip_that_cannot_load_changes_nothing_and_says_why(suite):
    with suite.client() as client:
        before = client.get_alias("chat")
        store = Path(client.get_model("tiny:v3").store_path)
        for weights in store.glob("*.safetensors"):
            weights.write_bytes(b"not weights")
        with pytest.raises(errors.FailedPrecondition) as failed:
            client.set_alias("chat", "tiny:v3")
        assert failed.value.reason == "MODEL_LOAD_FAILED" and "tiny:v3" in failed.value.details()
        after = client.get_alias("chat")
        assert after.targets == before.targets and after.update_time == before.update_time
        assert state(client, "tiny:v3") == "STATE_FAILED"         # its failed placement says why
        assert client.get_model("tiny:v3").placements[0].detail == failed.value.details()
        assert answer(client, "chat", "conv-0", max_tokens=1)[0] in ("tiny:v1", "tiny:v2")


@pytest.mark.parametrize("targets, code, reason", [
    ({"tiny:v9": 100}, errors.FailedPrecondition, "ALIAS_TARGET_NOT_FOUND"),
    ({"tiny:v1": 80, "tiny:v2": 30}, errors.InvalidArgument, "WEIGHTS_NOT_100"),
    ({"tiny:v1": 0, "tiny:v2": 100}, errors.InvalidArgument, "INVALID_WEIGHT"),
    ({"chat": 100}, errors.FailedPrecondition, "ALIAS_CYCLE"),
])
def test_bad_alias_changes_are_refused_when_made(suite, targets, code, reason):
    with suite.client() as client:
        before = client.get_alias("chat")
        with pytest.raises(code) as refused:
            client.set_alias("chat", targets)
        assert refused.value.reason == reason, refused.value
        assert client.get_alias("chat").targets == before.targets


def test_a_cycle_through_two_aliases_and_an_alias_named_like_a_model_are_refused(suite):
    with suite.client() as client:
        client.set_alias("assistant", "chat")
        assert answer(client, "assistant", "conv-1", max_tokens=1)[0] in ("tiny:v1", "tiny:v2")
        with pytest.raises(errors.FailedPrecondition) as cycle:
            client.set_alias("chat", "assistant")
        assert cycle.value.reason == "ALIAS_CYCLE" and "assistant" in cycle.value.details()
        with pytest.raises(errors.FailedPrecondition) as taken:
            client.set_alias("tiny:v1", "tiny:v2")
        assert taken.value.reason == "ALIAS_NAME_TAKEN"
        with pytest.raises(grpc.RpcError) as in_use:
            client.registry.DeleteModel(registry_pb2.DeleteModelRequest(name="tiny:v2"), timeout=10)
        assert errors.from_call(in_use.value).reason == "MODEL_IN_ALIAS"
        with pytest.raises(errors.FailedPrecondition) as used:
            client.delete_alias("chat")
        assert used.value.reason == "ALIAS_IN_USE"
        client.delete_alias("assistant")
        with pytest.raises(errors.NotFound):
            client.get_alias("assistant")


# ---- fine-tunes: LoRA adapters over tiny:v1 -------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory, versions) -> dict[str, Path]:
    root = versions["v1"].parent
    return {"lora-a": adapter_of(versions["v1"], root / "lora-a", 1),
            "lora-b": adapter_of(versions["v1"], root / "lora-b", 2, target_modules=["q_proj", "v_proj"], r=4),
            "lora-c": adapter_of(versions["v1"], root / "lora-c", 3,
                                 target_modules=["gate_proj", "up_proj", "down_proj"], lora_alpha=32)}


def token_ids(client, model: str, max_tokens: int = ANSWER_TOKENS) -> tuple[str, list[int]]:
    version, ids = "", []
    for response in client.generate(model, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True, timeout=60):
        version = version or response.model
        ids += response.token_ids
    return version, ids


def test_adapters_answer_as_peft_generate_each_in_one_batch_with_the_base(suite, versions, adapters):
    with suite.client() as client:
        for name, path in adapters.items():
            imported = client.import_model("tiny", str(path), tag=name, base="tiny:v1").model
            assert imported.base == "tiny:v1" and imported.adapter_rank == (4 if name == "lora-b" else 8)
        expected = {name: peft_greedy(versions["v1"], path, PROMPT, ANSWER_TOKENS) for name, path in adapters.items()}
        expected["v1"] = peft_greedy(versions["v1"], None, PROMPT, ANSWER_TOKENS)
        assert len({tuple(ids) for ids in expected.values()}) == 4, "an adapter does not change the answer"
        models = [f"tiny:{name}" for name in ("lora-a", "lora-b", "lora-c", "v1")] * 2
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda m: token_ids(client, m), models))
        for model, (version, ids) in zip(models, answers, strict=True):
            assert version == model and ids == expected[model.split(":")[1]], model
        client.set_alias("tuned", "tiny:lora-b")
        assert token_ids(client, "tuned") == ("tiny:lora-b", expected["lora-b"])
        client.delete_alias("tuned")


def test_adapters_the_engine_cannot_serve_are_refused_at_import(suite, versions, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    cases = {
        "pickle": (errors.InvalidArgument, "ADAPTER_PICKLE_WEIGHTS"),
        "other-base": (errors.FailedPrecondition, "ADAPTER_BASE_MISMATCH"),
        "rank-32": (errors.FailedPrecondition, "ADAPTER_RANK_UNSUPPORTED"),
        "lm-head": (errors.FailedPrecondition, "ADAPTER_MODULES_UNSUPPORTED"),
    }
    root = versions["v1"].parent
    pickled = adapter_of(versions["v1"], root / "pickle", 4)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1)}, pickled / "adapter_model.bin")
    save_adapter(other, root / "other-base", 5)
    adapter_of(versions["v1"], root / "rank-32", 6, r=32)
    adapter_of(versions["v1"], root / "lm-head", 7, target_modules=["q_proj", "lm_head"])
    with suite.client() as client:
        for name, (kind, reason) in cases.items():
            with pytest.raises(kind) as refused:
                client.import_model("tiny", str(root / name), tag=name, base="tiny:v1")
            assert refused.value.reason == reason, (name, refused.value)
            with pytest.raises(errors.NotFound):
                client.get_model(f"tiny:{name}")
        with pytest.raises(errors.NotFound):
            client.import_model("tiny", str(root / "lora-a"), tag="orphan", base="nothing:here")
