"""A model's LoRA adapter cache on a real runner: adapters loaded on first use under leases of their
own, the least recently used idle one dropped (its lease given back) past the limit or when the
device has no room, and what it refuses: a full cache of running adapters, a directory outside
the model's store."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmos.common.errors import InvalidArgument, ResourceExhausted
from llmos.engine import EngineDriver
from llmos.engine.loader import load_model
from llmos.worker.adapter_cache import AdapterCache
from tests.support.lora import adapter_of


class Budget:
    """The resource manager's side of leases, with a fixed number of bytes to grant."""

    def __init__(self, nbytes: int) -> None:
        self.free = nbytes
        self.leases: dict[str, tuple[str, int]] = {}

    async def acquire(self, holder: str, device: str, nbytes: int, ttl: float) -> str:
        if nbytes > self.free:
            raise ResourceExhausted(f"{nbytes} bytes asked, {self.free} free", reason="DEVICE_MEMORY_EXHAUSTED")
        self.free -= nbytes
        name = f"leases/{len(self.leases) + 1}-{holder}"
        self.leases[name] = (holder, nbytes)
        return name

    async def release(self, lease: str) -> None:
        self.free += self.leases.pop(lease)[1]

    def holders(self) -> list[str]:
        return sorted(holder.rsplit("/", 1)[1] for holder, _ in self.leases.values())


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    """A model store: the tiny model and three adapters of it side by side."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(tiny_model_dir, root / "model")
    for i, name in enumerate(("a", "b", "c")):
        adapter_of(root / "model", root / name, i + 1, r=4)
    return root


@pytest.fixture(scope="module")
def runner(store):
    return load_model("tiny", str(store / "model"), torch.device("cpu"), torch.float32, 4, 64).runner


@pytest.fixture
def driver():
    driver = EngineDriver()
    driver.start_thread()
    yield driver
    driver.stop()


def cache_of(store, runner, driver, budget: Budget, max_loaded: int) -> AdapterCache:
    return AdapterCache("tiny:latest", str(store / "model"), runner, driver, budget, "w1", "cpu", 15.0, max_loaded)


async def test_the_least_recently_used_idle_adapter_makes_room_and_gives_its_lease_back(store, runner, driver):
    budget = Budget(1 << 30)
    cache = cache_of(store, runner, driver, budget, max_loaded=2)
    for name in ("tiny:a", "tiny:b"):
        cache.give_back((await cache.take(name, str(store / name[5:])))[1])
    cache.give_back((await cache.take("tiny:a", str(store / "a")))[1])     # a is now the most recently used
    await cache.take("tiny:c", str(store / "c"))
    assert cache.names == ["tiny:c", "tiny:a"] and budget.holders() == ["tiny:a", "tiny:c"]
    assert cache.nbytes > 0
    await cache.close()
    assert budget.leases == {} and cache.names == []


async def test_a_full_cache_of_running_adapters_refuses_another_with_a_retry(store, runner, driver):
    budget = Budget(1 << 30)
    cache = cache_of(store, runner, driver, budget, max_loaded=2)
    await cache.take("tiny:a", str(store / "a"))
    _, b = await cache.take("tiny:b", str(store / "b"))
    with pytest.raises(ResourceExhausted) as full:
        await cache.take("tiny:c", str(store / "c"))
    assert full.value.reason == "ADAPTER_CACHE_FULL" and full.value.retry_after
    cache.give_back(b)
    await cache.take("tiny:c", str(store / "c"))             # b finished: it makes room
    assert sorted(cache.names) == ["tiny:a", "tiny:c"] and budget.holders() == ["tiny:a", "tiny:c"]
    await cache.close()


async def test_a_device_without_room_drops_an_idle_adapter_and_refuses_when_none_is_idle(store, runner, driver):
    probe = Budget(1 << 30)
    cache = cache_of(store, runner, driver, probe, max_loaded=8)
    await cache.take("tiny:a", str(store / "a"))
    one = next(iter(probe.leases.values()))[1]
    await cache.close()
    budget = Budget(one + one // 2)                          # room for one adapter at a time
    cache = cache_of(store, runner, driver, budget, max_loaded=8)
    cache.give_back((await cache.take("tiny:a", str(store / "a")))[1])
    await cache.take("tiny:b", str(store / "b"))
    assert cache.names == ["tiny:b"] and budget.holders() == ["tiny:b"]
    with pytest.raises(ResourceExhausted) as no_room:
        await cache.take("tiny:c", str(store / "c"))
    assert no_room.value.reason == "DEVICE_MEMORY_EXHAUSTED"          # the resource manager's refusal, as it is
    assert cache.names == ["tiny:b"] and budget.holders() == ["tiny:b"]
    await cache.close()


async def test_a_directory_outside_the_models_store_is_refused_however_it_is_reached(store, runner, driver,
                                                                                   tmp_path):
    outside = shutil.copytree(store / "a", tmp_path / "a")
    (store / "link").symlink_to(outside, target_is_directory=True)
    cache = cache_of(store, runner, driver, Budget(1 << 30), max_loaded=2)
    try:
        for path in (outside, store / "model" / ".." / ".." / outside.parent.name / "a", store / "link"):
            with pytest.raises(InvalidArgument) as refused:
                await cache.take("tiny:a", str(path))
            assert refused.value.reason == "ADAPTER_PATH_OUTSIDE_STORE", path
        assert cache.names == []
    finally:
        (store / "link").unlink()


async def test_a_load_that_fails_gives_its_lease_back(store, runner, driver):
    broken = shutil.copytree(store / "a", store / "broken")
    weights = broken / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])                 # the header reads, the tensors do not
    budget = Budget(1 << 30)
    cache = cache_of(store, runner, driver, budget, max_loaded=2)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the loader says; the lease is the point
            await cache.take("tiny:broken", str(broken))
        assert budget.leases == {} and cache.names == []
    finally:
        shutil.rmtree(broken)


async def test_an_adapter_imported_again_under_its_name_is_loaded_from_its_new_directory(store, runner, driver):
    cache = cache_of(store, runner, driver, Budget(1 << 30), max_loaded=4)
    first, key = await cache.take("tiny:a", str(store / "a"))
    cache.give_back(key)
    again, _ = await cache.take("tiny:a", str(store / "b"))   # the name's weights are b's now
    assert again is not first and again.layers[0]["q_proj"][0].shape == first.layers[0]["q_proj"][0].shape
    assert not torch.equal(again.layers[0]["q_proj"][0], first.layers[0]["q_proj"][0])
    await cache.close()
