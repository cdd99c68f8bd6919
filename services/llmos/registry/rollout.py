"""Moving an alias from one model version to another without downtime.

A change loads and warms every version the alias will send traffic to (where its versions run
now), then writes the alias in one transaction: that is the flip. Each version no alias sends
traffic to any more is drained: the registry watches its workers until none has a request
for it running or waiting, then unloads it (or first keeps it loaded for the alias's rollback
window). A rollback is a flip to the previous versions. Every step is a `WatchModels` event
and an audit line.
"""

from __future__ import annotations

import asyncio
import logging
import time

from llmos.common.errors import FailedPrecondition, InvalidArgument, LlmosError, NotFound
from llmos.common.names import ModelRef, parse_model_ref

from . import events
from .aliases import MAX_ROLLBACK_WINDOW, AliasRecord, check_targets, describe
from .catalog import page_by_ref
from .models import ModelRegistry

log = logging.getLogger(__name__)
audit = logging.getLogger("llmos.audit")

# Consecutive polls of a draining version's workers that must find it idle, and their interval.
QUIET_POLLS = 2


class Rollouts:
    def __init__(self, registry: ModelRegistry, poll_seconds: float = 0.25) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()         # one alias change at a time
        self._drains: dict[ModelRef, asyncio.Task] = {}

    # reading ---------------------------------------------------------------

    def get(self, name: str) -> AliasRecord:
        ref = parse_model_ref(name, "name")
        record = self.registry.aliases.get(ref)
        if record is None:
            raise NotFound(f"no alias {ref}", reason="ALIAS_NOT_FOUND", metadata={"alias": str(ref)})
        return record

    def list(self, page_size: int, page_token: str) -> tuple[list[AliasRecord], str]:
        return page_by_ref(self.registry.aliases.list, lambda r: r.ref, page_size, page_token)

    # changing --------------------------------------------------------------

    async def set(self, name: str, targets: list[tuple[str, int]],
                  rollback_window: float = 0.0) -> tuple[AliasRecord, bool]:
        """Warms the new versions, flips the alias to them, and starts draining the versions
        no alias sends traffic to any more. Returns (the alias, whether it changed)."""
        ref = parse_model_ref(name, "name")
        checked = check_targets(targets)
        if not 0 <= rollback_window <= MAX_ROLLBACK_WINDOW:
            raise InvalidArgument.field("rollback_window", "must be between 0 and 1 day")
        registry = self.registry
        async with self._lock:
            registry.resolver.check(ref, checked)
            current = registry.aliases.get(ref)
            if current is not None and current.targets == checked:
                return current, False
            old = registry.resolver.leaves(current.targets) if current else set()
            old |= {self._served_by(m) for m in old}            # an adapter's base with it (its placements)
            new = registry.resolver.leaves(checked)
            await self._warm(new, old)
            record = AliasRecord(ref, checked, current.targets if current else (), rollback_window, time.time())
            registry.aliases.put(record)
            for model in new | {self._served_by(m) for m in new}:   # it gets traffic again: no drain
                self._stop_drain(model)
            rollback = current is not None and checked == current.previous
            what = f"{describe(current.targets) if current else 'nothing'} → {describe(checked)}"
            registry.events.emit(str(ref), events.ROLLED_BACK if rollback else events.ALIAS_SET, reason=what)
            audit.info("audit: alias %s %s: %s", ref, "rolled back" if rollback else "flipped", what)
            log.info("alias %s now points at %s", ref, describe(checked))
            for model in sorted(old - self._with_traffic()):
                self._start_drain(model, ref, rollback_window)
        return record, True

    async def delete(self, name: str) -> None:
        record = self.get(name)
        async with self._lock:
            pointing = self.registry.resolver.pointing_at(record.ref)
            if pointing:
                raise FailedPrecondition(f"alias {pointing[0]} points at alias {record.ref}", reason="ALIAS_IN_USE",
                                         metadata={"alias": str(record.ref), "by": str(pointing[0])})
            self.registry.aliases.delete(record.ref)
            self.registry.events.emit(str(record.ref), events.ALIAS_DELETED,
                                      reason=f"pointed at {describe(record.targets)}")
            audit.info("audit: alias %s deleted (pointed at %s)", record.ref, describe(record.targets))

    async def _warm(self, models: set[ModelRef], old: set[ModelRef]) -> None:
        """Loads every model of `models` (an adapter: its base) as many times as the old versions
        run, on their workers first. On a failure, unloads what this call loaded and raises."""
        registry = self.registry
        bases = {self._served_by(m) for m in models}
        prefer = frozenset(p.worker_id for m in old for p in registry.ready_on(m))      # `old` holds the bases
        replicas = max([len(registry.ready_on(m)) for m in old] + [1])
        loaded: list[ModelRef] = []
        try:
            for base in sorted(bases):
                was_ready = bool(registry.ready_on(base))
                await registry.load(str(base), replicas, prefer=prefer)
                if not was_ready:
                    loaded.append(base)
        except LlmosError as exc:
            for base in loaded:
                try:
                    await registry.unload(str(base), reason="its alias did not flip: " + exc.message)
                except LlmosError as undo:
                    log.warning("could not unload %s after a failed flip: %s", base, undo.message)
            raise

    def _served_by(self, ref: ModelRef) -> ModelRef:
        """The model whose placements serve `ref`: its base for an adapter, else itself."""
        record = self.registry.catalog.get(ref)
        return record.served_by if record is not None else ref

    def _with_traffic(self) -> set[ModelRef]:
        """The models some alias sends traffic to, and the bases of such adapters."""
        leaves = self.registry.resolver.with_traffic()
        return leaves | {self._served_by(m) for m in leaves}

    # draining --------------------------------------------------------------

    def _stop_drain(self, model: ModelRef, why: str = "it gets traffic again") -> None:
        task = self._drains.pop(model, None)
        if task is not None:
            task.cancel()
            log.info("%s no longer draining: %s", model, why)

    def _start_drain(self, model: ModelRef, alias: ModelRef, window: float) -> None:
        self._stop_drain(model, f"drained anew after alias {alias} moved")
        task = asyncio.get_running_loop().create_task(self._drain(model, alias, window))
        self._drains[model] = task
        task.add_done_callback(lambda t: self._drains.pop(model, None) if self._drains.get(model) is t else None)

    async def _drain(self, model: ModelRef, alias: ModelRef, window: float) -> None:
        registry = self.registry
        emit = registry.events.emit
        emit(str(model), events.DRAINING, reason=f"{alias} sends it no traffic; waiting for its requests in flight")
        audit.info("audit: %s draining: alias %s moved away from it", model, alias)
        try:
            if self._served_by(model) != model:
                emit(str(model), events.DRAINED, reason="an adapter: its requests end on its base, and it stays "
                                                        "in the workers' adapter caches until they need the room")
                return
            await self._idle(model)
            if window > 0:
                emit(str(model), events.DRAINED, reason=f"kept loaded {window:.0f}s for a rollback")
                await asyncio.sleep(window)
                await self._idle(model)
            else:
                emit(str(model), events.DRAINED, reason="unloading")
            async with self._lock:          # no flip may send it traffic while it is unloaded
                if model in self._with_traffic() or not registry.ready_on(model):
                    return
                await registry.unload(str(model), reason=f"drained: alias {alias} moved away from it")
                audit.info("audit: %s unloaded after draining (alias %s)", model, alias)
        except LlmosError as exc:
            log.warning("draining %s after alias %s moved: %s", model, alias, exc.message)

    async def _idle(self, model: ModelRef) -> None:
        """Waits until no worker has a request for `model` in flight, polls apart. (A change
        that sends it traffic again cancels the drain.)"""
        quiet = 0
        while quiet < QUIET_POLLS:
            await asyncio.sleep(self.poll_seconds)
            quiet = quiet + 1 if await self.registry.in_flight(model) == 0 else 0

    async def close(self) -> None:
        for task in list(self._drains.values()):
            task.cancel()
        if self._drains:
            await asyncio.gather(*self._drains.values(), return_exceptions=True)
