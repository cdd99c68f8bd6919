"""Two registry replicas on one store (SQLite and PostgreSQL): what one does, the other sees after
it refreshes; their events have one order; a model's loads are serialized across them."""

from __future__ import annotations

import asyncio

import pytest

from llmos.common.store import Store, StoreMutex
from llmos.registry import events
from llmos.registry.catalog import Catalog
from llmos.registry.models import ModelRegistry
from llmos.registry.shared import Shared
from tests.unit.registry.test_registry import FakeWorkers, importer, make_source


class SlowWorkers(FakeWorkers):
    """Loads take a while, so two replicas' loads of one model overlap unless serialized."""

    async def start_model(self, address, model, path, estimated_bytes, quantize=""):
        await asyncio.sleep(0.3)
        return await super().start_model(address, model, path, estimated_bytes, quantize)


@pytest.fixture
async def replicas(tmp_path, store_url):
    made = []
    workers = SlowWorkers()
    for i in range(2):
        store = Store(store_url)
        shared = Shared(store)
        registry = ModelRegistry(Catalog(store), importer(tmp_path), workers, shared=shared,
                                 mutex=StoreMutex(store, f"replica-{i}", ttl=5.0, poll=0.05))
        made.append((registry, asyncio.ensure_future(shared.run())))
    yield [r for r, _ in made], workers
    for registry, journal in made:
        journal.cancel()
        registry.close()
        registry.shared.close()
        registry.catalog.close()


async def test_what_one_replica_does_the_other_sees_and_loads_of_one_model_take_turns(tmp_path, replicas):
    (a, b), workers = replicas
    await a.import_model("tiny", "", str(make_source(tmp_path / "src")))
    await a.register_worker("w1", "127.0.0.1:1", "node")
    await b.register_worker("w2", "127.0.0.1:2", "node")
    await asyncio.gather(a.shared.flush(), b.shared.flush())     # (their journals write within ms)
    for replica in (a, b):
        await replica.sync()
        assert set(replica.workers) == {"w1", "w2"}
    # Both asked at once for one replica of the model: one loads it, the other finds it loaded.
    (view_a, placed_a), (view_b, placed_b) = await asyncio.gather(a.load("tiny"), b.load("tiny"))
    assert len([c for c in workers.calls if c[0] != "stop"]) == 1, workers.calls
    assert placed_a.worker_id == placed_b.worker_id
    await a.sync()
    await b.sync()
    for replica in (a, b):
        view = await replica.get("tiny")
        assert [(p.worker_id, p.state) for p in view.placements] == [(placed_a.worker_id, "ready")]
    # Unloaded on one, gone on the other after it refreshes.
    await b.unload("tiny")
    await b.shared.flush()
    await a.sync()
    assert (await a.get("tiny")).placements == []
    # A worker one replica dropped is dropped on the other.
    a.drop_silent_workers(-1.0)
    await a.shared.flush()
    await b.sync()
    assert b.workers == {}


async def test_events_of_both_replicas_are_read_back_in_the_order_they_were_written(tmp_path, replicas):
    (a, b), _ = replicas
    shared = a.shared
    start = await shared.read(shared.last_seq)
    for i in range(5):
        (a if i % 2 else b).events.emit(f"m{i}:latest", events.IMPORTED, reason=str(i))
        await (a if i % 2 else b).shared.flush()
    found = await shared.read(shared.events_after, start)
    assert [e.reason for _, e in found] == ["0", "1", "2", "3", "4"]
    assert [seq for seq, _ in found] == sorted(seq for seq, _ in found)
    delivered = []
    watch = b.events.watch()
    reader = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    b.events.deliver(found[0][1])       # a watcher gets only what is delivered from the store
    delivered.append(await reader)
    assert delivered == [found[0][1]]
    await watch.aclose()


async def test_a_change_answers_only_once_every_watch_has_sent_its_events(tmp_path, replicas):
    """`settle` (what a changing call awaits before it answers) waits for the store's events to reach
    this replica's watchers and for each watch to have sent them (asked for the next event), so a
    client that stops watching when its call answers has seen the call's last event."""
    (a, _), _ = replicas
    following = asyncio.ensure_future(a.follow(interval=0.05))
    sent: list[str] = []

    async def slow_watch():                 # a gRPC stream whose sends take a while
        async for event in a.events.watch():
            await asyncio.sleep(0.2)
            sent.append(event.kind)

    watching = asyncio.ensure_future(slow_watch())
    try:
        await asyncio.sleep(0.1)
        await a.import_model("tiny", "", str(make_source(tmp_path / "src")))
        await a.settle(timeout=10.0)
        assert sent == [events.IMPORTING, events.IMPORTED]
        assert a.events.pending() == 0
    finally:
        for task in (watching, following):
            task.cancel()
        await asyncio.gather(watching, following, return_exceptions=True)
