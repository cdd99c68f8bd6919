"""Memory leases: who holds how many bytes on which device, persisted in SQLite.

The sum of the leases on a device never exceeds its budget. A lease survives a
restart of the resource manager because it lives in the database.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from llmos.common.errors import InvalidArgument, NotFound, ResourceExhausted


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    node: str
    device: str
    bytes: int
    create_time: float


@dataclass(frozen=True)
class Budget:
    """How much may be leased on one device."""

    node: str
    device: str
    budget_bytes: int


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class LeaseBook:
    """Grants and releases leases against per-device budgets."""

    def __init__(self, db_path: str, budgets: Callable[[], list[Budget]],
                 clock: Callable[[], float] = time.time) -> None:
        self._budgets = budgets
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
            "node TEXT NOT NULL, device TEXT NOT NULL, bytes INTEGER NOT NULL, "
            "create_time REAL NOT NULL)")

    def close(self) -> None:
        self._db.close()

    def leased(self, node: str, device: str) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM leases WHERE node=? AND device=?",
                               (node, device)).fetchone()
        return int(row[0])

    def acquire(self, holder: str, node: str, device: str, nbytes: int) -> Lease:
        if not holder or len(holder) > 256:
            raise InvalidArgument.field("holder", "is required, at most 256 characters")
        if nbytes <= 0:
            raise InvalidArgument.field("bytes", f"must be greater than 0, got {nbytes}")
        budget = next((b for b in self._budgets() if b.node == node and b.device == device), None)
        if budget is None:
            raise NotFound(f"no device {device!r} on node {node!r}", reason="DEVICE_NOT_FOUND",
                           metadata={"node": node, "device": device})
        with self._lock:
            leased = self.leased(node, device)
            if leased + nbytes > budget.budget_bytes:
                raise ResourceExhausted(
                    f"cannot lease {_gib(nbytes)} on {node}/{device}: {_gib(leased)} of its "
                    f"{_gib(budget.budget_bytes)} budget is already leased",
                    reason="DEVICE_MEMORY_EXHAUSTED",
                    metadata={"node": node, "device": device, "requested_bytes": str(nbytes),
                              "leased_bytes": str(leased), "budget_bytes": str(budget.budget_bytes)})
            lease = Lease(name=f"leases/{uuid.uuid4()}", holder=holder, node=node, device=device,
                          bytes=nbytes, create_time=self._clock())
            self._db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                             (lease.name, lease.holder, lease.node, lease.device, lease.bytes,
                              lease.create_time))
        return lease

    def release(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM leases WHERE name=?", (name,)).rowcount > 0

    def list(self) -> list[Lease]:
        rows = self._db.execute("SELECT name, holder, node, device, bytes, create_time FROM leases "
                                "ORDER BY create_time, name").fetchall()
        return [Lease(*row) for row in rows]
