import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmos.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmos.common.names import ModelRef
from llmos.common.store import Store
from llmos.registry.catalog import Catalog
from llmos.registry.importer import Importer
from llmos.registry.models import ModelRegistry
from llmos.registry.sources import SourcePolicy
from llmos.registry.weights import KvShape, estimate_bytes, read_facts

SMALL_KV = KvShape(tokens=16)
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
          "num_key_value_heads": 1, "num_hidden_layers": 2, "max_position_embeddings": 128}


def make_source(path, fill=1.0):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    save_file({"a": np.full((4, 8), fill, dtype=np.float32), "b": np.zeros(8, dtype=np.float16)},
              str(path / "model.safetensors"))
    return path


class FakeWorkers:
    def __init__(self, fail=False):
        self.fail = fail
        self.calls = []

    async def start_model(self, address, model, path, estimated_bytes, quantize=""):
        self.calls.append((address, model) + ((quantize,) if quantize else ()))
        if self.fail:
            raise FailedPrecondition("the weights do not load", reason="MODEL_LOAD_FAILED")
        return 1234

    async def stop_model(self, address, model):
        self.calls.append(("stop", address, model))


def importer(tmp_path):
    return Importer(tmp_path / "store", SourcePolicy([tmp_path]))


@pytest.fixture
def registry(tmp_path, store_url):
    catalog = Catalog(Store(store_url))
    yield ModelRegistry(catalog, importer(tmp_path), FakeWorkers(), kv=SMALL_KV, overhead_bytes=100)
    catalog.close()


def test_facts_and_estimate_come_from_config_and_headers(tmp_path):
    facts = read_facts(make_source(tmp_path / "m"))
    assert facts.parameter_count == 40
    assert facts.weight_bytes == 32 * 4 + 8 * 2
    assert facts.dtype == "float32" and facts.context_length == 128 and facts.has_chat_template
    # KV: 2 layers x (K and V) x 1 kv head x head_dim 4 x 2 bytes x 16 tokens
    assert estimate_bytes(facts, kv=SMALL_KV, overhead_bytes=100) == 144 + 2 * 2 * 1 * 4 * 2 * 16 + 100


async def test_import_is_idempotent_by_digest_and_persists(tmp_path, registry, store_url):
    source = make_source(tmp_path / "src")
    view, created = await registry.import_model("tiny", "", str(source))
    assert created and view.record.tag == "latest" and view.record.digest.startswith("sha256:")
    again, created_again = await registry.import_model("tiny", "latest", str(source))
    assert not created_again and again.record == view.record
    reopened = Catalog(Store(store_url))
    assert reopened.get(view.record.ref) == view.record
    reopened.close()


async def test_other_weights_under_a_taken_tag_are_refused(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "one")))
    with pytest.raises(AlreadyExists):
        await registry.import_model("tiny", "", str(make_source(tmp_path / "two", fill=2.0)))


async def test_bad_sources_are_refused_with_reasons(tmp_path, registry):
    with pytest.raises(NotFound):
        await registry.import_model("x", "", str(tmp_path / "missing"))
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidArgument) as caught:
        await registry.import_model("x", "", str(pickle_dir))
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    with pytest.raises(InvalidArgument):
        await registry.import_model("Bad Name", "", str(make_source(tmp_path / "ok")))


async def test_list_pages_through_the_catalog(tmp_path, registry):
    source = make_source(tmp_path / "src")
    for name in ["c", "a", "b"]:
        await registry.import_model(name, "", str(source))
    first, token = await registry.list(2, "")
    second, last = await registry.list(2, token)
    assert [v.record.name for v in first + second] == ["a", "b", "c"] and last == ""


async def test_load_places_on_a_worker_and_is_idempotent(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    with pytest.raises(Unavailable):
        await registry.load("tiny")
    await registry.register_worker("w1", "127.0.0.1:9", "node")
    view, placement = await registry.load("tiny")
    assert (placement.worker_id, placement.state, placement.measured_bytes) == ("w1", "ready", 1234)
    assert view.state == "ready"
    await registry.load("tiny")
    assert registry._worker_port.calls == [("127.0.0.1:9", "tiny:latest")]


async def test_a_failed_load_is_recorded_with_its_reason(tmp_path, store_url):
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), FakeWorkers(fail=True))
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node")
    with pytest.raises(FailedPrecondition):
        await registry.load("tiny")
    view = await registry.get("tiny")
    assert view.state == "failed" and view.placements[0].detail == "the weights do not load"
    catalog.close()


async def test_a_restarted_worker_loses_its_placements(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node", incarnation="first")
    await registry.load("tiny")
    await registry.register_worker("w1", "127.0.0.1:9", "node", incarnation="first")
    assert (await registry.get("tiny")).state == "ready"
    await registry.register_worker("w1", "127.0.0.1:9", "node", incarnation="second")
    assert (await registry.get("tiny")).state == "available"
    await registry.load("tiny")
    assert len(registry._worker_port.calls) == 2


class FakeResources:
    def __init__(self, budget):
        self.budget = budget

    async def largest_budget(self):
        return self.budget, "node/cpu"


class StoppingWorkers(FakeWorkers):
    def __init__(self):
        super().__init__()
        self.stopped = []

    async def stop_model(self, address, model):
        self.stopped.append((address, model))


async def test_a_model_bigger_than_any_device_is_refused_before_any_worker_is_asked(tmp_path, store_url):
    catalog = Catalog(Store(store_url))
    workers = FakeWorkers()
    registry = ModelRegistry(catalog, importer(tmp_path), workers, kv=SMALL_KV, overhead_bytes=100,
                             resources=FakeResources(budget=200))
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node")
    with pytest.raises(ResourceExhausted) as caught:
        await registry.load("tiny")
    assert caught.value.reason == "MODEL_TOO_LARGE"
    assert "node/cpu" in caught.value.message and caught.value.metadata["budget_bytes"] == "200"
    assert workers.calls == []
    catalog.close()


async def test_unload_stops_it_everywhere_and_delete_needs_it_unloaded(tmp_path, store_url):
    catalog = Catalog(Store(store_url))
    workers = StoppingWorkers()
    registry = ModelRegistry(catalog, importer(tmp_path), workers)
    view, _ = await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node")
    await registry.load("tiny")
    assert catalog.get(view.record.ref).measured_bytes == 1234, "the measured size is kept for next time"
    with pytest.raises(FailedPrecondition):
        await registry.delete("tiny")
    assert (await registry.unload("tiny")).state == "available"
    assert workers.stopped == [("127.0.0.1:9", "tiny:latest")]
    await registry.delete("tiny")
    with pytest.raises(NotFound):
        await registry.get("tiny")
    assert not (tmp_path / "store" / view.record.digest.removeprefix("sha256:")).exists()
    catalog.close()


async def test_silent_workers_are_dropped_and_a_restarted_registry_relearns_placements(tmp_path, store_url):
    now = [0.0]
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), FakeWorkers(), clock=lambda: now[0])
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest"])
    await registry.register_worker("w2", "127.0.0.1:8", "node", "i2")
    assert (await registry.get("tiny")).state == "ready", "the worker's own report places the model"
    now[0] = 15.0
    await registry.register_worker("w2", "127.0.0.1:8", "node", "i2")
    now[0] = 25.0
    assert registry.drop_silent_workers(timeout=20.0) == [ModelRef("tiny")]
    assert (await registry.get("tiny")).state == "available" and set(registry.workers) == {"w2"}
    catalog.close()


async def test_a_model_its_worker_no_longer_lists_is_no_longer_placed_there(tmp_path, store_url):
    """The worker's heartbeat lists what it holds: a READY placement missing from it is dropped,
    unless it became ready after the previous heartbeat arrived (a load that finished while
    this heartbeat was on its way appears in the next one)."""
    now = [0.0]
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), FakeWorkers(), clock=lambda: now[0])
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1")
    now[0] = 1.0
    await registry.load("tiny")                       # ready at 1.0, after the heartbeat at 0.0
    now[0] = 2.0
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=[])  # composed before the load
    assert (await registry.get("tiny")).state == "ready"
    now[0] = 3.0
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest"])
    now[0] = 4.0
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=[])  # it stopped the model
    assert (await registry.get("tiny")).state == "available" and (await registry.get("tiny")).placements == []
    catalog.close()


async def test_a_heartbeat_composed_before_an_unload_does_not_place_the_model_again(tmp_path, store_url):
    """A heartbeat on its way while the registry unloads a model still lists it: the model stays
    unloaded (and can be deleted at once); a heartbeat after the next one that still lists it is
    believed (the worker holds it)."""
    now = [0.0]
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), FakeWorkers(), clock=lambda: now[0])
    source = str(make_source(tmp_path / "src"))
    await registry.import_model("tiny", "", source)
    await registry.import_model("tiny", "second", source)
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1")
    now[0] = 1.0
    await registry.load("tiny")
    await registry.load("tiny:second")
    now[0] = 2.0
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest", "tiny:second"])
    now[0] = 3.0
    await registry.unload("tiny:second")
    now[0] = 3.5
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest", "tiny:second"])
    assert (await registry.get("tiny:second")).state == "available"
    assert (await registry.get("tiny")).state == "ready"
    now[0] = 5.0
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest", "tiny:second"])
    assert (await registry.get("tiny:second")).state == "ready", "a later heartbeat still lists it: it is held"
    now[0] = 6.0
    await registry.unload("tiny:second")
    now[0] = 6.5
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest", "tiny:second"])
    await registry.delete("tiny:second")                              # not "loaded; unload it first"
    catalog.close()


async def test_a_second_worker_claiming_a_live_workers_id_is_refused(tmp_path, store_url):
    now = [0.0]
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), FakeWorkers(), clock=lambda: now[0], worker_timeout=20.0)
    await registry.register_worker("w1", "10.0.0.1:50055", "n1", "first")
    now[0] = 5.0
    with pytest.raises(AlreadyExists) as caught:
        await registry.register_worker("w1", "10.0.0.2:50055", "n2", "second")
    assert caught.value.reason == "WORKER_ID_IN_USE" and "10.0.0.1:50055" in caught.value.message
    await registry.register_worker("w1", "10.0.0.1:50055", "n1", "restarted")     # the same worker, restarted: fine
    now[0] = 30.0                                                          # silent for longer than the timeout
    await registry.register_worker("w1", "10.0.0.2:50055", "n2", "moved")        # its id may move on
    assert registry.workers["w1"].address == "10.0.0.2:50055"
    catalog.close()


async def test_models_of_a_lost_worker_are_loaded_on_another_with_room(tmp_path, store_url):
    now = [0.0]
    catalog = Catalog(Store(store_url))
    workers = FakeWorkers()
    registry = ModelRegistry(catalog, importer(tmp_path), workers, clock=lambda: now[0])
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest"])
    await registry.register_worker("w2", "127.0.0.1:8", "node", "i2")
    now[0] = 25.0
    await registry.register_worker("w2", "127.0.0.1:8", "node", "i2")
    assert await registry.recover(timeout=20.0) == ["tiny:latest"]
    assert workers.calls == [("127.0.0.1:8", "tiny:latest")]
    assert [(p.worker_id, p.state) for p in (await registry.get("tiny")).placements] == [("w2", "ready")]
    catalog.close()


class RoomyWorker:
    """A worker with room for `capacity` bytes, refusing like the resource manager does."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.loaded = {}          # model -> bytes
        self.last = {}            # model -> last request time
        self.in_flight = {}
        self.clock = 0.0

    async def start_model(self, address, model, path, needed, quantize=""):
        if model in self.loaded:
            return self.loaded[model]
        if sum(self.loaded.values()) + needed > self.capacity:
            raise ResourceExhausted("lease refused", reason="DEVICE_MEMORY_EXHAUSTED")
        self.clock += 1
        self.loaded[model], self.last[model] = needed, self.clock
        return needed

    async def stop_model(self, address, model):
        self.loaded.pop(model, None)

    async def activity(self, address):
        return {m: (self.in_flight.get(m, 0), self.last[m]) for m in self.loaded}

    def use(self, model):
        self.clock += 1
        self.last[model] = self.clock


ESTIMATE = 756  # each model below: weights 144 + KV 2x2x1x4x2x16 = 512 + overhead 100 bytes


async def three_models(tmp_path, worker, store_url):
    catalog = Catalog(Store(store_url))
    registry = ModelRegistry(catalog, importer(tmp_path), worker, kv=SMALL_KV, overhead_bytes=100)
    for i, name in enumerate(["a", "b", "c"]):
        await registry.import_model(name, "", str(make_source(tmp_path / name, fill=float(i + 1))))
    await registry.register_worker("w1", "127.0.0.1:9", "node")
    assert {(await registry.get(n)).record.estimated_bytes for n in "abc"} == {ESTIMATE}
    return registry


async def test_loading_a_third_model_evicts_the_least_recently_used_idle_one(tmp_path, store_url):
    worker = RoomyWorker(capacity=2 * ESTIMATE + 100)  # room for two of the three
    registry = await three_models(tmp_path, worker, store_url)
    await registry.load("a")
    await registry.load("b")
    worker.use("a:latest")                # b is now the least recently used
    await registry.load("c")
    assert set(worker.loaded) == {"a:latest", "c:latest"}
    assert (await registry.get("b")).state == "available" and (await registry.get("c")).state == "ready"


async def test_a_model_with_requests_in_flight_is_never_evicted(tmp_path, store_url):
    worker = RoomyWorker(capacity=2 * ESTIMATE + 100)  # room for two of the three
    registry = await three_models(tmp_path, worker, store_url)
    await registry.load("a")
    await registry.load("b")
    worker.in_flight["a:latest"] = 1      # a is older but busy: b goes
    await registry.load("c")
    assert set(worker.loaded) == {"a:latest", "c:latest"}
    worker.in_flight["c:latest"] = 2
    with pytest.raises(ResourceExhausted) as caught:
        await registry.load("b")
    assert caught.value.reason == "NO_ROOM" and caught.value.retry_after
    assert set(worker.loaded) == {"a:latest", "c:latest"}
    assert (await registry.get("b")).placements == []


async def test_models_idle_past_keep_alive_are_unloaded(tmp_path, store_url):
    worker = RoomyWorker(capacity=10_000)
    registry = await three_models(tmp_path, worker, store_url)
    await registry.load("a")
    await registry.load("b")
    worker.use("b:latest")
    worker.in_flight["a:latest"] = 1
    assert await registry.evict_idle(keep_alive=1.0, now=worker.last["b:latest"] + 5) == [("b:latest", "w1")]
    assert set(worker.loaded) == {"a:latest"}


async def test_replicas_load_the_model_on_more_workers(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    for i in range(3):
        await registry.register_worker(f"w{i}", f"127.0.0.1:{i}", "node")
    await registry.load("tiny")
    view, _ = await registry.load("tiny", replicas=2)
    assert sorted(p.worker_id for p in view.placements) == ["w0", "w1"]
    view, _ = await registry.load("tiny", replicas=5)      # only three workers: serves on three
    assert sorted(p.worker_id for p in view.placements) == ["w0", "w1", "w2"]
    with pytest.raises(InvalidArgument):
        await registry.load("tiny", replicas=-1)


async def test_keep_alive_set_at_load_overrides_the_default_for_that_model(tmp_path, store_url):
    worker = RoomyWorker(capacity=10_000)
    registry = await three_models(tmp_path, worker, store_url)
    await registry.load("a", keep_alive=-1.0)            # never unloaded for idleness
    await registry.load("b", keep_alive=100.0)
    await registry.load("c")                             # the default (1 s below)
    now = max(worker.last.values()) + 5
    assert await registry.evict_idle(keep_alive=1.0, now=now) == [("c:latest", "w1")]
    assert (await registry.get("a")).record.keep_alive == -1.0
    assert await registry.evict_idle(keep_alive=1.0, now=now + 200) == [("b:latest", "w1")]
    assert set(worker.loaded) == {"a:latest"}


async def test_a_quantized_load_runs_its_variant_and_more_replicas_follow_it(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    for i in range(2):
        await registry.register_worker(f"w{i}", f"127.0.0.1:{i}", "node")
    view, placement = await registry.load("tiny", quantize="int8")
    assert placement.quantization == "int8"
    assert registry._worker_port.calls == [(placement.address, "tiny:latest", "int8")]
    assert view.record.measured_bytes == 0              # the record's figure stays the stored weights'
    view, _ = await registry.load("tiny", replicas=2)   # unspecified: the ready placements' variant
    assert [p.quantization for p in view.placements] == ["int8", "int8"]
    with pytest.raises(InvalidArgument):
        await registry.load("tiny", quantize="int4")


async def test_a_quantized_load_where_the_stored_weights_run_is_refused_until_unloaded(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w0", "127.0.0.1:0", "node")
    await registry.load("tiny")
    with pytest.raises(FailedPrecondition) as refused:
        await registry.load("tiny", quantize="int8")
    assert refused.value.reason == "QUANTIZATION_MISMATCH"
    await registry.unload("tiny")
    _, placement = await registry.load("tiny", quantize="int8")
    assert placement.quantization == "int8"


async def test_a_restarted_registry_relearns_which_weights_a_placement_runs(tmp_path, registry):
    await registry.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await registry.register_worker("w1", "127.0.0.1:9", "node", "i1", loaded_models=["tiny:latest"],
                             quantizations={"tiny:latest": "int8"})
    assert [p.quantization for p in (await registry.get("tiny")).placements] == ["int8"]
    await registry.register_worker("w2", "127.0.0.1:8", "node", "i2")
    view, _ = await registry.load("tiny", replicas=2)      # the new replica follows the relearned weights
    assert sorted(p.quantization for p in view.placements) == ["int8", "int8"]
