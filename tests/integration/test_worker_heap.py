"""A worker's models frozen out of the garbage collector's walks as they load (`common.heap`, where the
worker's own process asks for it), and freed whole as they unload."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from llmos.engine import EngineDriver
from llmos.worker.host import EngineConfig, ModelHost
from tests.support.wait import wait_for


class Resources:
    """A resource manager that grants every lease."""

    async def acquire(self, holder: str, device: str, nbytes: int, ttl: float) -> str:
        return f"lease-{holder}"

    async def release(self, lease: str) -> None:
        pass

    async def release_holders(self, holder_prefix: str) -> int:
        return 0

    async def renew(self, holder_prefix: str, in_use_bytes: int, device: str) -> int:
        return 0


def frozen(obj: object) -> bool:
    """Whether the collector no longer walks `obj` (frozen objects are in none of its generations)."""
    return all(o is not obj for o in gc.get_objects())


@pytest.mark.parametrize("settle", [True, False], ids=["settled", "as-is"])
def test_a_loaded_model_is_frozen_where_asked_and_freed_as_it_unloads(tiny_model_dir, settle):
    driver = EngineDriver()
    driver.start_thread()
    host = ModelHost("w", Resources(), torch.device("cpu"), torch.float32, driver,
                     EngineConfig(max_running=4, max_seq_len=128, kv_cache_tokens=1024), settle_heap=settle)

    async def load() -> weakref.ref:
        await host.heartbeat()
        served = await host.start_model("tiny", str(tiny_model_dir), 1 << 20)
        return weakref.ref(served.loaded.runner)

    try:
        runner = asyncio.run(load())
        assert frozen(runner()) == settle
        asyncio.run(host.stop_model("tiny"))
        # Freed once the driver's round that closed its engine ends (nothing of a round outlives it).
        wait_for(lambda: gc.collect() >= 0 and runner() is None, timeout=10, what="the unloaded model freed")
    finally:
        gc.unfreeze()
        driver.stop()
