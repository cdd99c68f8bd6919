"""Memory leases: who holds how many bytes on which device, persisted in SQLite.

The sum of the leases on a device never exceeds its budget. A lease survives a
restart of the resource manager because it lives in the database. A lease with a
TTL must be renewed (its holder's heartbeat) or it is reclaimed: a worker that
dies without releasing its leases gives its memory back within one TTL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from llmos.common.errors import InvalidArgument, NotFound, ResourceExhausted

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
class Budget:
    """How much may be leased on one device."""

    node: str
    device: str
    budget_bytes: int


_COLUMNS = "name, holder, node, device, bytes, create_time, ttl, expire_time"


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with `prefix` literally."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class LeaseBook:
    """Grants and releases leases against per-device budgets."""

    def __init__(self, db_path: str, budgets: Callable[[], list[Budget]],
                 clock: Callable[[], float] = time.time) -> None:
        self._budgets = budgets
        self._clock = clock
        self._lock = threading.Lock()
        self.reclaimed_total = 0      # leases reclaimed by `reap` since this book opened
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
            "node TEXT NOT NULL, device TEXT NOT NULL, bytes INTEGER NOT NULL, "
            "create_time REAL NOT NULL, ttl REAL NOT NULL DEFAULT 0, expire_time REAL NOT NULL DEFAULT 0)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(leases)")}
        for column in ("ttl", "expire_time"):
            if column not in columns:
                self._db.execute(f"ALTER TABLE leases ADD COLUMN {column} REAL NOT NULL DEFAULT 0")
        self.grant_grace()

    def grant_grace(self) -> int:
        """Gives every TTL lease at least one TTL from now; returns how many were extended.

        Called when this book starts reclaiming: while no reclaimer ran, holders could not
        renew (their renewals failed), so a lease that ran out then says nothing about its
        holder. A holder that is really gone loses its lease one TTL later."""
        with self._lock:
            return self._db.execute("UPDATE leases SET expire_time = ? + ttl WHERE ttl > 0 AND expire_time < ? + ttl",
                                    (self._clock(), self._clock())).rowcount

    def close(self) -> None:
        self._db.close()

    def leased(self, node: str, device: str) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM leases WHERE node=? AND device=?",
                               (node, device)).fetchone()
        return int(row[0])

    def acquire(self, holder: str, node: str, device: str, nbytes: int, ttl: float = 0.0) -> Lease:
        if not holder or len(holder) > 256 or not holder.isprintable():
            raise InvalidArgument.field("holder", "is required, at most 256 printable characters")
        if not 0 < nbytes <= MAX_LEASE_BYTES:
            raise InvalidArgument.field("bytes", f"must be greater than 0 and at most 2^50, got {nbytes}")
        if not 0 <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument.field("ttl", f"must be between 0 and {MAX_TTL_SECONDS:.0f} seconds")
        budget = next((b for b in self._budgets() if b.node == node and b.device == device), None)
        if budget is None:
            raise NotFound(f"no device {device!r} on node {node!r}", reason="DEVICE_NOT_FOUND",
                           metadata={"node": node, "device": device})
        self.reap()
        with self._lock:
            leased = self.leased(node, device)
            if leased + nbytes > budget.budget_bytes:
                raise ResourceExhausted(
                    f"cannot lease {_gib(nbytes)} on {node}/{device}: {_gib(leased)} of its "
                    f"{_gib(budget.budget_bytes)} budget is already leased",
                    reason="DEVICE_MEMORY_EXHAUSTED",
                    metadata={"node": node, "device": device, "requested_bytes": str(nbytes),
                              "leased_bytes": str(leased), "budget_bytes": str(budget.budget_bytes)})
            now = self._clock()
            lease = Lease(name=f"leases/{uuid.uuid4()}", holder=holder, node=node, device=device,
                          bytes=nbytes, create_time=now, ttl=ttl, expire_time=now + ttl if ttl else 0.0)
            self._db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (lease.name, lease.holder, lease.node, lease.device, lease.bytes,
                              lease.create_time, lease.ttl, lease.expire_time))
        return lease

    def leased_by(self, holder_prefix: str, node: str, device: str) -> int:
        pattern = _like_prefix(holder_prefix)
        row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM leases WHERE holder LIKE ? ESCAPE '\\' "
                               "AND node=? AND device=?", (pattern, node, device)).fetchone()
        return int(row[0])

    def renew(self, holder_prefix: str) -> int:
        """Extends every TTL lease of holders starting with the prefix; returns how many."""
        if not holder_prefix:
            raise InvalidArgument.field("holder_prefix", "is required")
        pattern = _like_prefix(holder_prefix)
        with self._lock:
            return self._db.execute(
                "UPDATE leases SET expire_time = ? + ttl WHERE ttl > 0 AND holder LIKE ? ESCAPE '\\'",
                (self._clock(), pattern)).rowcount

    def reap(self) -> list[Lease]:
        """Reclaims the leases whose TTL ran out; returns them."""
        with self._lock:
            rows = self._db.execute(f"DELETE FROM leases WHERE ttl > 0 AND expire_time < ? RETURNING {_COLUMNS}",
                                    (self._clock(),)).fetchall()
            self.reclaimed_total += len(rows)
        return [Lease(*row) for row in rows]

    def release(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM leases WHERE name=?", (name,)).rowcount > 0

    def list(self) -> list[Lease]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM leases ORDER BY create_time, name").fetchall()
        return [Lease(*row) for row in rows]
