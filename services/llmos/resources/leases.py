"""Memory leases: who holds how many bytes on which device, in the store.

The sum of the leases on a device never exceeds its budget. Each resource manager
publishes its node's devices and budgets to the store (`publish`), and a lease is granted
against the device's row, locked for the check, so that several replicas sharing one
store never overcommit a device. A lease survives a restart because it lives in the
store. A lease with a TTL must be renewed (its holder's heartbeat) or it is reclaimed: a
worker that dies without releasing its leases gives its memory back within one TTL.
Reclaiming runs on one replica at a time (the leader, see `llmos.common.store.Leadership`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from llmos.common.errors import InvalidArgument, NotFound, ResourceExhausted
from llmos.common.store import Store, devices, leases

from .inventory import DeviceInfo

# The longest lease a caller may ask for without renewing it, and the largest.
MAX_TTL_SECONDS = 86400.0
MAX_LEASE_BYTES = 2**50


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    node: str
    device: str
    bytes: int
    create_time: float
    ttl: float = 0.0            # seconds; 0: lives until released
    expire_time: float = 0.0    # 0 when it has no TTL


@dataclass(frozen=True)
class DeviceRecord:
    """A device as its node's resource manager last published it."""

    node: str
    info: DeviceInfo
    budget_bytes: int
    update_time: float


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with `prefix` literally."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _holder_starts_with(prefix: str):
    return leases.c.holder.like(_like_prefix(prefix), escape="\\")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _lease(row) -> Lease:
    return Lease(row.name, row.holder, row.node, row.device, row.bytes, row.create_time, row.ttl, row.expire_time)


class LeaseBook:
    """Grants and releases leases against per-device budgets."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self.reclaimed_total = 0      # leases reclaimed by `reap` in this process

    def close(self) -> None:
        self.store.close()

    def publish(self, node: str, inventory: list[tuple[DeviceInfo, int]]) -> None:
        """Records `node`'s devices with their budgets (bytes leases may hold)."""
        now = self._clock()
        rows = [((devices.c.node == node, devices.c.device == info.name),
                 dict(kind=info.kind, product=info.product[:256], total_bytes=info.total_bytes,
                      used_bytes=info.used_bytes, budget_bytes=budget, cores=info.cores, update_time=now), info.name)
                for info, budget in inventory]
        try:
            with self.store.begin() as db:
                for where, values, name in rows:
                    if db.execute(update(devices).where(*where).values(values)).rowcount == 0:
                        db.execute(insert(devices).values(node=node, device=name, **values))
        except IntegrityError:          # another replica of the same node inserted them meanwhile
            with self.store.begin() as db:
                for where, values, _ in rows:
                    db.execute(update(devices).where(*where).values(values))

    def devices(self) -> list[DeviceRecord]:
        """Every published device of every node, by node and device name ("cpu" first)."""
        with self.store.begin() as db:
            rows = db.execute(select(devices).order_by(devices.c.node, devices.c.device != "cpu",
                                                       devices.c.device)).all()
        return [DeviceRecord(r.node, DeviceInfo(r.device, r.kind, r.product, r.total_bytes, r.used_bytes, r.cores),
                             r.budget_bytes, r.update_time) for r in rows]

    def leased(self, node: str, device: str) -> int:
        with self.store.begin() as db:
            return self._leased(db, node, device, self._clock())

    @staticmethod
    def _leased(db, node: str, device: str, now: float) -> int:
        """Bytes leased on the device; leases that ran out do not count, reclaimed or not yet."""
        live = or_(leases.c.ttl == 0, leases.c.expire_time >= now)
        return int(db.execute(select(func.coalesce(func.sum(leases.c.bytes), 0))
                              .where(leases.c.node == node, leases.c.device == device, live)).scalar_one())

    def acquire(self, holder: str, node: str, device: str, nbytes: int, ttl: float = 0.0) -> Lease:
        if not holder or len(holder) > 256 or not holder.isprintable():
            raise InvalidArgument.field("holder", "is required, at most 256 printable characters")
        if not 0 < nbytes <= MAX_LEASE_BYTES:
            raise InvalidArgument.field("bytes", f"must be greater than 0 and at most 2^50, got {nbytes}")
        if not 0 <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument.field("ttl", f"must be between 0 and {MAX_TTL_SECONDS:.0f} seconds")
        now = self._clock()
        with self.store.begin() as db:
            budget = db.execute(select(devices.c.budget_bytes).where(devices.c.node == node, devices.c.device == device)
                                .with_for_update()).scalar()
            if budget is None:
                raise NotFound(f"no device {device!r} on node {node!r}", reason="DEVICE_NOT_FOUND",
                               metadata={"node": node[:256], "device": device[:64]})
            # Leases of this device that ran out are reclaimed here, before their memory is
            # given again: left in place, a late renewal or a reclaimer's grace could revive one
            # and put the device over its budget.
            expired = db.execute(delete(leases).where(leases.c.node == node, leases.c.device == device,
                                                      leases.c.ttl > 0, leases.c.expire_time < now)).rowcount
            self.reclaimed_total += max(0, expired)
            leased = self._leased(db, node, device, now)
            if leased + nbytes > budget:
                raise ResourceExhausted(
                    f"cannot lease {_gib(nbytes)} on {node}/{device}: {_gib(leased)} of its "
                    f"{_gib(budget)} budget is already leased",
                    reason="DEVICE_MEMORY_EXHAUSTED",
                    metadata={"node": node, "device": device, "requested_bytes": str(nbytes),
                              "leased_bytes": str(leased), "budget_bytes": str(budget)})
            lease = Lease(name=f"leases/{uuid.uuid4()}", holder=holder, node=node, device=device,
                          bytes=nbytes, create_time=now, ttl=ttl, expire_time=now + ttl if ttl else 0.0)
            db.execute(insert(leases).values(vars(lease)))
        return lease

    def leased_by(self, holder_prefix: str, node: str, device: str) -> int:
        with self.store.begin() as db:
            return int(db.execute(select(func.coalesce(func.sum(leases.c.bytes), 0)).where(
                _holder_starts_with(holder_prefix), leases.c.node == node, leases.c.device == device)).scalar_one())

    def renew(self, holder_prefix: str) -> int:
        """Extends every TTL lease of holders starting with the prefix; returns how many."""
        if not holder_prefix:
            raise InvalidArgument.field("holder_prefix", "is required")
        with self.store.begin() as db:
            return db.execute(update(leases).where(leases.c.ttl > 0, _holder_starts_with(holder_prefix))
                              .values(expire_time=self._clock() + leases.c.ttl)).rowcount

    def grant_grace(self) -> int:
        """Gives every TTL lease at least one TTL from now; returns how many were extended.

        Called when a replica takes up reclaiming: while no reclaimer ran (the resource
        manager was down), holders could not renew, so a lease that ran out then says nothing
        about its holder. A holder that is really gone loses its lease one TTL later."""
        now = self._clock()
        with self.store.begin() as db:
            return db.execute(update(leases).where(leases.c.ttl > 0, leases.c.expire_time < now + leases.c.ttl)
                              .values(expire_time=now + leases.c.ttl)).rowcount

    def reap(self) -> list[Lease]:
        """Reclaims the leases whose TTL ran out; returns them."""
        with self.store.begin() as db:
            rows = db.execute(delete(leases).where(leases.c.ttl > 0, leases.c.expire_time < self._clock())
                              .returning(*leases.c)).all()
        self.reclaimed_total += len(rows)
        return [_lease(row) for row in rows]

    def get(self, name: str) -> Lease | None:
        with self.store.begin() as db:
            row = db.execute(select(leases).where(leases.c.name == name)).first()
        return _lease(row) if row else None

    def release(self, name: str) -> bool:
        with self.store.begin() as db:
            return db.execute(delete(leases).where(leases.c.name == name)).rowcount > 0

    def release_holders(self, holder_prefix: str) -> int:
        """Gives back every lease whose holder starts with the prefix; returns how many."""
        if not holder_prefix:
            raise InvalidArgument.field("holder_prefix", "is required")
        with self.store.begin() as db:
            return db.execute(delete(leases).where(_holder_starts_with(holder_prefix))).rowcount

    def list(self) -> list[Lease]:
        with self.store.begin() as db:
            rows = db.execute(select(leases).order_by(leases.c.create_time, leases.c.name)).all()
        return [_lease(row) for row in rows]
