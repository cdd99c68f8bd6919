"""One loaded model's LoRA adapters in memory, loaded on first use and dropped least recently
used first.

Each adapter in the cache holds a memory lease of its own (holder
`worker/<id>/adapter/<model>/<adapter>`, renewed with the worker's other leases), so adapters
are counted against the device's budget as the model's weights and KV cache are: its tensors,
and its copies in the stacked sets of adapters the runner keeps for its steps (`lora.py`, at
most `STACKS_KEPT` sets, each B block as wide as its fused product; a set that mixes ranks pads
each adapter to its widest, which this does not count). A new adapter
evicts the least recently used idle one when the cache holds `max_loaded` already, or when the
resource manager has no room for its lease; when every cached adapter is running a request, the
request is refused with RESOURCE_EXHAUSTED (ADAPTER_CACHE_FULL) and a retry delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmos.common.adapters import AdapterFacts, read_adapter
from llmos.common.errors import InvalidArgument, LlmosError, ResourceExhausted, Unavailable
from llmos.common.names import parse_model_ref, worker_lease_prefix
from llmos.engine import EngineDriver
from llmos.engine.lora import KINDS, STACKS_KEPT, Adapter, load_adapter, require_adapters

log = logging.getLogger(__name__)

# The registry checked the rank at import; the worker serves whatever it was given.
NO_RANK_LIMIT = 1 << 16


class Leases(Protocol):
    async def acquire(self, holder: str, device: str, nbytes: int, ttl: float) -> str: ...

    async def release(self, lease: str) -> None: ...


def adapter_lease_holder(worker_id: str, model: str, adapter: str) -> str:
    return f"{worker_lease_prefix(worker_id)}adapter/{model}/{adapter}"


@dataclass
class _Entry:
    adapter: Adapter
    lease: str
    in_use: int = 0


class AdapterCache:
    def __init__(self, model: str, model_path: str, runner: Any, driver: EngineDriver, leases: Leases,
                 worker_id: str, device: str, lease_ttl: float, max_loaded: int = 8) -> None:
        self.model = model
        self._model_path = Path(model_path)
        self._runner = runner
        self._driver = driver
        self._leases = leases
        self._worker_id = worker_id
        self._device = device
        self._lease_ttl = lease_ttl
        self.max_loaded = max_loaded
        # (name, directory) → entry, least recently used first: an adapter deleted and imported again
        # under its name has another directory (the store's are named by digest).
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._loading = asyncio.Lock()
        self._closed = False
        self._base_config: dict | None = None       # the model's config.json, read at the first adapter

    @property
    def names(self) -> list[str]:
        """The cached adapters, the most recently used first."""
        return [name for name, _ in reversed(self._entries)]

    @property
    def nbytes(self) -> int:
        return sum(e.adapter.nbytes for e in self._entries.values())

    async def take(self, name: str, path: str) -> tuple[Adapter, tuple[str, str]]:
        """The adapter `name` (from `path`), loaded if it is not cached, and the key to give it
        back with (`give_back`); in use until then. `path` must be a directory of the model
        store the model itself came from."""
        path = await asyncio.to_thread(self._checked, name, path)
        key = (name, path)
        entry = self._entries.get(key)
        if entry is None:
            async with self._loading:
                entry = self._entries.get(key) or await self._load(name, path)
        entry.in_use += 1
        self._entries.move_to_end(key)
        return entry.adapter, key

    def give_back(self, key: tuple[str, str]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.in_use > 0:
            entry.in_use -= 1

    def _checked(self, name: str, path: str) -> str:
        parse_model_ref(name, "adapter")
        resolved = Path(path).resolve()
        if resolved.parent != self._model_path.resolve().parent:
            raise InvalidArgument.field("adapter_path", "is not a directory of the model store this model was "
                                        "loaded from", reason="ADAPTER_PATH_OUTSIDE_STORE")
        return str(resolved)

    async def _load(self, name: str, path: str) -> _Entry:
        require_adapters(self._runner, name, self.model)
        if self._closed:
            raise Unavailable(f"model {self.model} is unloading", reason="MODEL_UNLOADING")
        if self._base_config is None:
            self._base_config = json.loads(await asyncio.to_thread((self._model_path / "config.json").read_text))
        facts = await asyncio.to_thread(read_adapter, Path(path), self._base_config, NO_RANK_LIMIT)
        nbytes = leased_bytes(facts, self._runner)
        while len(self._entries) >= self.max_loaded:
            await self._evict_one(name)
        holder = adapter_lease_holder(self._worker_id, self.model, name)
        while True:
            try:
                lease = await self._leases.acquire(holder, self._device, nbytes, self._lease_ttl)
                break
            except ResourceExhausted:
                if not self._idle():
                    raise
                await self._evict_one(name)
        try:
            adapter = await asyncio.wrap_future(self._driver.call(load_adapter, name, Path(path), self._runner, facts))
        except BaseException:
            await self._release(lease, name)
            raise
        entry = self._entries[name, path] = _Entry(adapter, lease)
        log.info("adapter %s of %s loaded (%d bytes, rank %d)", name, self.model, adapter.nbytes, facts.rank)
        return entry

    def _idle(self) -> list[tuple[str, str]]:
        return [key for key, e in self._entries.items() if e.in_use == 0]

    async def _evict_one(self, wanted: str) -> None:
        idle = self._idle()
        if not idle:
            raise ResourceExhausted(
                f"the adapter cache of {self.model} holds {len(self._entries)} adapters, each running a request; "
                f"{wanted} waits for one of them to finish", reason="ADAPTER_CACHE_FULL", retry_after=1.0,
                metadata={"model": self.model, "adapter": wanted, "cached": str(len(self._entries))})
        await self._drop(idle[0], f"to make room for {wanted}")

    async def _drop(self, key: tuple[str, str], why: str) -> None:
        name = key[0]
        entry = self._entries.pop(key)
        self._driver.call(self._runner.release_adapter, entry.adapter)
        await self._release(entry.lease, name)
        log.info("adapter %s of %s dropped %s", name, self.model, why)

    async def _release(self, lease: str, name: str) -> None:
        try:
            await self._leases.release(lease)
        except LlmosError as exc:       # renewed with the worker's leases until the resource manager reclaims it
            log.warning("could not release the lease of adapter %s: %s", name, exc.message)

    async def close(self) -> None:
        """Drops every adapter (the model is unloading); a load under way finishes first."""
        async with self._loading:
            self._closed = True
            for key in list(self._entries):
                await self._drop(key, "with its model")


def leased_bytes(facts: AdapterFacts, runner: Any) -> int:
    """What an adapter may hold on `runner`: its tensors, and a copy in each kept stack (per
    layer and fused product, A [in, r x its projections there] and B [that, every output column])."""
    import torch

    element = torch.empty((), dtype=runner.dtype).element_size()
    shapes = runner.module_shapes
    stacked = 0
    for modules in KINDS.values():
        adapted = [m for m in modules if m in facts.target_modules]
        if adapted:
            width = facts.rank * len(adapted)
            stacked += width * (shapes[modules[0]][0] + sum(shapes[m][1] for m in modules))
    return facts.nbytes_as(element) + STACKS_KEPT * stacked * len(facts.layers) * element
