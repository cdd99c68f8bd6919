"""Moving an alias from one model version to another without downtime.

A change loads and warms every version the alias will send traffic to (where its versions run
now), then writes the alias in one transaction: that is the flip. Each version no alias sends
traffic to any more is drained: the registry watches its workers until none has a request
for it running or waiting, then unloads it (or first keeps it loaded for the alias's rollback
window). A rollback is a flip to the previous versions. Every step is a `WatchModels` event
and an audit line.

Drains are rows in the store (`drains`), worked through by the leading registry replica every
`poll_seconds`: a replica that dies mid-drain or in a rollback window leaves its row, and the
next leader finishes the drain, keeping the version loaded until the window ends. Alias changes
and the unloads that end drains take a lock every replica shares (`StoreMutex`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from sqlalchemy import delete, select

from llmos.common.errors import FailedPrecondition, InvalidArgument, LlmosError, NotFound
from llmos.common.names import ModelRef, parse_model_ref
from llmos.common.store import Store, aliases, drains

from . import events
from .aliases import MAX_ROLLBACK_WINDOW, AliasBook, AliasRecord, check_targets, describe
from .catalog import page_by_ref
from .models import ModelRegistry
from .shared import Drain

log = logging.getLogger(__name__)
audit = logging.getLogger("llmos.audit")

# Consecutive polls of a draining version's workers that must find it idle.
QUIET_POLLS = 2
# The longest a flip's write may take (it holds the lock on alias changes meanwhile), seconds.
FLIP_SECONDS = 30.0


class Rollouts:
    def __init__(self, registry: ModelRegistry, poll_seconds: float = 0.25) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()         # one alias change at a time (on every replica: `_changing`)
        self._quiet: dict[ModelRef, int] = {}

    @property
    def store(self) -> Store:
        return self.registry.catalog.store

    # reading ---------------------------------------------------------------

    async def get(self, name: str) -> AliasRecord:
        ref = parse_model_ref(name, "name")
        record = await self.registry.db(self.registry.aliases.get, ref)
        if record is None:
            raise NotFound(f"no alias {ref}", reason="ALIAS_NOT_FOUND", metadata={"alias": str(ref)})
        return record

    async def list(self, page_size: int, page_token: str) -> tuple[list[AliasRecord], str]:
        return await self.registry.db(page_by_ref, self.registry.aliases.list, lambda r: r.ref, page_size,
                                      page_token)

    # changing --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        async with self._lock:
            if self.registry.mutex is None:
                yield
                return
            async with self.registry.mutex.hold("registry.aliases"):
                try:
                    yield
                finally:            # its events and unloads are in the store before another replica changes
                    await self.registry.shared.flush()

    async def set(self, name: str, targets: list[tuple[str, int]],
                  rollback_window: float = 0.0) -> tuple[AliasRecord, bool]:
        """Warms the new versions, flips the alias to them, and starts draining the versions
        no alias sends traffic to any more. Returns (the alias, whether it changed)."""
        ref = parse_model_ref(name, "name")
        checked = check_targets(targets)
        if not 0 <= rollback_window <= MAX_ROLLBACK_WINDOW:
            raise InvalidArgument.field("rollback_window", "must be between 0 and 1 day")
        registry = self.registry
        async with self._changing():
            current, old, new = await registry.db(self._plan, ref, checked)
            if current is not None and current.targets == checked:
                return current, False
            await self._warm(new, old)
            record = AliasRecord(ref, checked, current.targets if current else (), rollback_window, time.time())
            drained, stopped = await registry.db(self._flip, record, old, timeout=FLIP_SECONDS)
            for model in stopped:
                log.info("%s no longer draining: it gets traffic again", model)
            rollback = current is not None and checked == current.previous
            what = f"{describe(current.targets) if current else 'nothing'} → {describe(checked)}"
            registry.events.emit(str(ref), events.ROLLED_BACK if rollback else events.ALIAS_SET, reason=what)
            audit.info("audit: alias %s %s: %s", ref, "rolled back" if rollback else "flipped", what)
            log.info("alias %s now points at %s", ref, describe(checked))
            for model, adapter in drained:
                registry.events.emit(str(model), events.DRAINING,
                                     reason=f"{ref} sends it no traffic; waiting for its requests in flight")
                audit.info("audit: %s draining: alias %s moved away from it", model, ref)
                if adapter:
                    registry.events.emit(str(model), events.DRAINED, reason=(
                        "an adapter: its requests end on its base, and it stays in the workers' adapter caches "
                        "until they need the room"))
        return record, True

    def _plan(self, ref: ModelRef, checked) -> tuple[AliasRecord | None, set[ModelRef], set[ModelRef]]:
        """(the alias now, the models it sends traffic to with their bases, those it will)."""
        registry = self.registry
        registry.resolver.check(ref, checked)
        current = registry.aliases.get(ref)
        old = registry.resolver.leaves(current.targets) if current else set()
        old |= {self._served_by(m) for m in old}            # an adapter's base with it (its placements)
        return current, old, registry.resolver.leaves(checked)

    def _flip(self, record: AliasRecord,
              old: set[ModelRef]) -> tuple[list[tuple[ModelRef, bool]], list[ModelRef]]:
        """Writes the alias, ends the drains of the versions it sends traffic to again and starts
        those of the old versions nothing sends traffic to now, in one transaction. Returns
        ((model, is an adapter) for each drain started, the models whose drain ended)."""
        traffic = self._with_traffic(record)
        started = [(m, self._served_by(m) != m) for m in sorted(old - traffic)]
        with self.store.begin() as db:
            self.store.upsert(db, aliases, AliasBook.row(record), "name", "tag")
            stopped = [ModelRef(r.name, r.tag) for r in db.execute(select(drains.c.name, drains.c.tag)).all()
                       if ModelRef(r.name, r.tag) in traffic]
            for model in stopped:
                db.execute(delete(drains).where(drains.c.name == model.name, drains.c.tag == model.tag))
            for model, adapter in started:
                if not adapter:
                    self.store.upsert(db, drains, {"name": model.name, "tag": model.tag, "alias": str(record.ref),
                                                   "rollback_window": record.rollback_window,
                                                   "start_time": time.time(), "idle_time": None}, "name", "tag")
        return started, stopped

    async def delete(self, name: str) -> None:
        record = await self.get(name)
        async with self._changing():
            pointing = await self.registry.db(self.registry.resolver.pointing_at, record.ref)
            if pointing:
                raise FailedPrecondition(f"alias {pointing[0]} points at alias {record.ref}", reason="ALIAS_IN_USE",
                                         metadata={"alias": str(record.ref), "by": str(pointing[0])})
            await self.registry.db(self.registry.aliases.delete, record.ref)
            self.registry.events.emit(str(record.ref), events.ALIAS_DELETED,
                                      reason=f"pointed at {describe(record.targets)}")
            audit.info("audit: alias %s deleted (pointed at %s)", record.ref, describe(record.targets))

    async def _warm(self, models: set[ModelRef], old: set[ModelRef]) -> None:
        """Loads every model of `models` (an adapter: its base) as many times as the old versions
        run, on their workers first. On a failure, unloads what this call loaded and raises."""
        registry = self.registry
        bases = await registry.db(lambda: {self._served_by(m) for m in models})
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
        """The model whose placements serve `ref`: its base for an adapter, else itself (blocking)."""
        record = self.registry.catalog.get(ref)
        return record.served_by if record is not None else ref

    def _with_traffic(self, changed: AliasRecord | None = None) -> set[ModelRef]:
        """The models some alias sends traffic to (once `changed` is written), and the bases of
        such adapters (blocking)."""
        leaves = self.registry.resolver.with_traffic(changed)
        return leaves | {self._served_by(m) for m in leaves}

    # draining (the leading replica) ----------------------------------------

    def _drains(self) -> tuple[list[Drain], set[ModelRef]]:
        with self.store.begin() as db:
            rows = db.execute(select(drains).order_by(drains.c.start_time)).all()
        found = [Drain(ModelRef(r.name, r.tag), r.alias, r.rollback_window, r.start_time, r.idle_time) for r in rows]
        return found, self._with_traffic() if found else set()

    def _set_drain(self, drain: Drain, idle_time: float | None = None, done: bool = False) -> None:
        """Marks the drain found idle (or ends it), unless a flip started it anew meanwhile."""
        where = (drains.c.name == drain.model.name, drains.c.tag == drain.model.tag,
                 drains.c.start_time == drain.start_time)
        with self.store.begin() as db:
            if done:
                db.execute(delete(drains).where(*where))
            else:
                db.execute(drains.update().where(*where).values(idle_time=idle_time))

    async def run_drains(self, leading) -> None:
        """Works through the drains every `poll_seconds` while `leading()` says this replica leads."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not leading():
                self._quiet.clear()
                continue
            try:
                await self.drain_step()
            except LlmosError as exc:
                log.warning("draining: %s", exc.message)
            except Exception:  # noqa: BLE001 - the next round tries again; the loop must not end
                log.exception("draining failed")

    async def drain_step(self) -> None:
        """One round: each draining version found idle QUIET_POLLS times in a row is unloaded,
        after its rollback window (which starts when it is first found idle)."""
        registry = self.registry
        found, traffic = await registry.db(self._drains)
        for drain in found:
            model = drain.model
            if model in traffic:            # a change sent it traffic again
                await registry.db(self._set_drain, drain, None, True)
                self._quiet.pop(model, None)
                continue
            quiet = self._quiet[model] = self._quiet.get(model, 0) + 1 if await registry.in_flight(model) == 0 else 0
            if quiet < QUIET_POLLS:
                continue
            if drain.idle_time is None:
                await registry.db(self._set_drain, drain, time.time())
                window = drain.rollback_window
                registry.events.emit(str(model), events.DRAINED, reason=f"kept loaded {window:.0f}s for a rollback"
                                     if window > 0 else "unloading")
                if window > 0:
                    self._quiet[model] = 0
                    continue
            elif time.time() < drain.idle_time + drain.rollback_window:
                self._quiet[model] = 0
                continue
            async with self._changing():    # no flip may send it traffic while it is unloaded
                now, traffic = await registry.db(self._drains)
                fresh = next((d for d in now if d.model == model), None)
                if fresh is None or fresh.start_time != drain.start_time or model in traffic:
                    continue                # a flip changed it meanwhile: the next round sees what it did
                try:
                    await registry.unload(str(model), reason=f"drained: alias {drain.alias} moved away from it")
                    audit.info("audit: %s unloaded after draining (alias %s)", model, drain.alias)
                except NotFound:
                    pass                    # deleted from the catalog meanwhile: nothing to unload
                await registry.db(self._set_drain, drain, None, True)
            self._quiet.pop(model, None)
