"""What the registry's replicas share through the store, so that any replica serves any call.

Each replica keeps a view of the workers and the placements in memory (what `ModelRegistry`
reads) and writes every change it makes to them, and every lifecycle event, through one journal
(`Shared`, a `Journal`): in order, a batch per transaction, on a thread of its own, so a slow or
stalled store never holds its event loop. Every replica tails the store's events in the order
they were written (`seq`: writers of events take the table's lock, so commit order is `seq`
order) and refreshes its view from the store before it hands them to its watchers: a watcher
of any replica sees every replica's events in one order, and a `GetModel` after a `READY` it saw
finds the placement.

A view is refreshed as a whole (`ModelRegistry.sync`) after what this replica changed was
written; a change it made while the read was on its way is kept over what the read found.
The drains and rollback windows (`drains`) are rows the leading replica works through
(`Rollouts.drain_step`), so a replica that starts resumes what one that died left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update

from llmos.common.names import ModelRef
from llmos.common.store import (
    Journal,
    Store,
    model_events,
    model_holds,
    placements,
    registry_workers,
)

from .events import ModelEvent

log = logging.getLogger(__name__)

# How many events the store keeps for late replicas, at least, and how long.
KEEP_EVENTS, KEEP_EVENTS_SECONDS = 10000, 3600.0


@dataclass(frozen=True)
class Drain:
    model: ModelRef
    alias: str
    rollback_window: float
    start_time: float
    idle_time: float | None = None      # when it was first found idle: its rollback window starts


@dataclass
class State:
    workers: dict       # worker id → Worker
    placements: dict    # (model, worker id) → Placement
    holds: dict         # model → Unix time


class Shared(Journal):
    def __init__(self, store: Store, interval: float = 0.02) -> None:
        super().__init__(store, "registry-state", interval)
        self._last_prune = time.monotonic()

    # writing (on the journal's thread) ----------------------------------------

    def due(self) -> list[tuple]:
        if time.monotonic() - self._last_prune < 60.0:
            return []
        self._last_prune = time.monotonic()
        return [("prune",)]

    def write(self, db, ops: list[tuple]) -> None:
        locked = False
        for op in ops:
            kind = op[0]
            if kind == "worker":
                w = op[1]
                self.store.upsert(db, registry_workers, {
                    "worker_id": w.worker_id, "address": w.address, "node": w.node, "incarnation": w.incarnation,
                    "metrics_address": w.metrics_address, "last_seen": w.last_seen}, "worker_id")
            elif kind == "worker_gone":
                db.execute(delete(registry_workers).where(registry_workers.c.worker_id == op[1]))
            elif kind == "placement":
                ref, p = op[1], op[2]
                self.store.upsert(db, placements, {
                    "name": ref.name, "tag": ref.tag, "worker_id": p.worker_id, "address": p.address,
                    "state": p.state, "detail": p.detail[:1024], "measured_bytes": p.measured_bytes,
                    "ready_at": p.ready_at, "quantization": p.quantization, "expire_time": p.expire_time},
                    "name", "tag", "worker_id")
            elif kind == "unplace":
                ref, worker_id = op[1], op[2]
                where = [placements.c.name == ref.name, placements.c.tag == ref.tag]
                if worker_id:
                    where.append(placements.c.worker_id == worker_id)
                db.execute(delete(placements).where(*where))
            elif kind == "expire":
                ref, worker_id, expires = op[1], op[2], op[3]
                db.execute(update(placements).where(
                    placements.c.name == ref.name, placements.c.tag == ref.tag, placements.c.worker_id == worker_id,
                    placements.c.state == "ready").values(expire_time=expires))
            elif kind == "hold":
                ref, until = op[1], op[2]
                self.store.upsert(db, model_holds, {"name": ref.name, "tag": ref.tag, "until": until}, "name", "tag")
            elif kind == "event":
                if not locked and self.store.dialect == "postgresql":
                    # One writer of events at a time until commit: `seq` is then commit order.
                    db.exec_driver_sql("LOCK TABLE model_events IN EXCLUSIVE MODE")
                locked = True
                e: ModelEvent = op[1]
                db.execute(insert(model_events).values(model=e.model, kind=e.kind, worker_id=e.worker_id,
                                                       reason=e.reason[:2048], time=e.time))
            elif kind == "prune":
                last = db.execute(select(func.max(model_events.c.seq))).scalar() or 0
                db.execute(delete(model_events).where(model_events.c.seq < last - KEEP_EVENTS,
                                                      model_events.c.time < time.time() - KEEP_EVENTS_SECONDS))
                db.execute(delete(model_holds).where(model_holds.c.until < time.time()))

    # reading (on the journal's thread: `Journal.read`) -------------------------

    def load_state(self) -> State:
        from .models import Placement, Worker

        with self.store.begin() as db:
            workers = {r.worker_id: Worker(r.worker_id, r.address, r.node, r.incarnation, r.last_seen,
                                           r.metrics_address) for r in db.execute(select(registry_workers))}
            placed = {(ModelRef(r.name, r.tag), r.worker_id): Placement(
                r.worker_id, r.address, r.state, r.detail, r.measured_bytes, r.ready_at, r.quantization,
                r.expire_time) for r in db.execute(select(placements))}
            holds = {ModelRef(r.name, r.tag): r.until for r in db.execute(select(model_holds))}
        return State(workers, placed, holds)

    def last_seq(self) -> int:
        with self.store.begin() as db:
            return db.execute(select(func.max(model_events.c.seq))).scalar() or 0

    def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ModelEvent]]:
        with self.store.begin() as db:
            rows = db.execute(select(model_events).where(model_events.c.seq > seq)
                              .order_by(model_events.c.seq).limit(limit)).all()
        return [(r.seq, ModelEvent(r.model, r.kind, r.worker_id, r.reason, r.time)) for r in rows]
