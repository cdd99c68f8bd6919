"""The durable store: one schema behind one interface, embedded SQLite or a cluster PostgreSQL.

Every durable record of the suite (the model catalog, memory leases and the nodes they are
counted against, tenants and API keys, and the leader leases of loops that run once
cluster-wide) is a table of `SCHEMA`, reached through SQLAlchemy Core. A store is chosen by
one URL: `sqlite:///path/file.db` (embedded; what `llmos up` uses, one file per service
unless they are given one URL) or `postgresql+psycopg://user:password@host:port/db` (the
cluster; every replica of every service may share it).

The schema is versioned with alembic (`llmos.migrations`). An embedded SQLite file is
brought up to date when it is opened: one host, one owner. A PostgreSQL store is migrated
only by `llmos migrate` (a Job in the Kubernetes manifests); a service that finds it behind
or unreachable reports NOT_SERVING and tries again with backoff (`StoreWatch`).

While the store cannot be reached, calls fail fast with UNAVAILABLE `STORE_UNAVAILABLE`
instead of each waiting for a connection timeout: after a failed connection the store is
"down", and one call now and then (with backoff) tries it again; the first that gets
through brings it back for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Double,
    Engine,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError

from .errors import InvalidArgument, Unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

SCHEMA = MetaData()

models = Table(
    "models", SCHEMA,
    Column("name", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("digest", String(160), nullable=False),
    Column("source_format", String(32), nullable=False),
    Column("source", String(4096), nullable=False),
    Column("path", String(4096), nullable=False),
    Column("architecture", String(128), nullable=False),
    Column("parameter_count", BigInteger, nullable=False),
    Column("dtype", String(32), nullable=False),
    Column("context_length", Integer, nullable=False),
    Column("has_chat_template", Boolean, nullable=False),
    Column("create_time", Double, nullable=False),
    Column("estimated_bytes", BigInteger, nullable=False),
    Column("measured_bytes", BigInteger, nullable=False, server_default="0"),
    Column("keep_alive", Double, nullable=True),
    Column("implementation", String(32), nullable=False, server_default="llmos"),
    # A LoRA adapter's base model ("name:tag") and rank; "" and 0 for a model.
    Column("base", String(256), nullable=False, server_default=""),
    Column("adapter_rank", Integer, nullable=False, server_default="0"),
    Column("tool_call_format", String(32), nullable=False, server_default=""),
    Column("task", String(16), nullable=False, server_default="generate"),
    PrimaryKeyConstraint("name", "tag"),
)

# Names that point at model versions: targets as JSON [[model, weight], ...].
aliases = Table(
    "aliases", SCHEMA,
    Column("name", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("targets", String(4096), nullable=False),
    Column("previous_targets", String(4096), nullable=False, server_default="[]"),
    Column("rollback_window", Double, nullable=False, server_default="0"),
    Column("update_time", Double, nullable=False),
    PrimaryKeyConstraint("name", "tag"),
)

leases = Table(
    "leases", SCHEMA,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False, index=True),
    Column("node", String(256), nullable=False),
    Column("device", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("create_time", Double, nullable=False),
    Column("ttl", Double, nullable=False, server_default="0"),
    Column("expire_time", Double, nullable=False, server_default="0"),
)

# Each resource manager publishes the devices of its node and their budgets, so that any
# replica can grant a lease on any node; a lease checks its device's row (locked) and sum.
devices = Table(
    "devices", SCHEMA,
    Column("node", String(256), nullable=False),
    Column("device", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("product", String(256), nullable=False),
    Column("total_bytes", BigInteger, nullable=False),
    Column("used_bytes", BigInteger, nullable=False),
    Column("budget_bytes", BigInteger, nullable=False),
    Column("cores", Integer, nullable=False),
    Column("update_time", Double, nullable=False),
    PrimaryKeyConstraint("node", "device"),
)

tenants = Table(
    "tenants", SCHEMA,
    Column("name", String(64), primary_key=True),
    Column("weight", Double, nullable=False),
    Column("priority_ceiling", Integer, nullable=False),
    Column("max_concurrent", BigInteger, nullable=False),
    Column("requests_per_minute", BigInteger, nullable=False),
    Column("tokens_per_minute", BigInteger, nullable=False),
    Column("create_time", Double, nullable=False),
)

api_keys = Table(
    "api_keys", SCHEMA,
    Column("key_id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("role", String(16), nullable=False),
    Column("label", String(128), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("create_time", Double, nullable=False),
    Column("expire_time", Double, nullable=True),
    Column("revoke_time", Double, nullable=True),
)

leaders = Table(
    "leaders", SCHEMA,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("expire_time", Double, nullable=False),
)

# The scheduler leader's quota charges (`llmos.scheduler.quotas`): one row per request of a
# tenant with limits, from its admission until a window after its end, so that a scheduler that
# takes over the lead counts what its tenants used in the last window and a failover cannot be
# used to pass a quota. Unix times; `end_time` is null while the request runs.
quota_charges = Table(
    "quota_charges", SCHEMA,
    Column("request_id", String(160), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("start_time", Double, nullable=False),
    Column("end_time", Double, nullable=True, index=True),
    Column("tokens", BigInteger, nullable=False),
)

# The registry's shared state, so that any registry replica serves any call and one that starts
# resumes where another stopped (`llmos.registry.shared`): the workers heard from (Unix time of
# the last heartbeat), where each model is placed, the versions draining after an alias moved
# away from them (`idle_time`: when they were found idle, the start of their rollback window),
# the loads a request asked to keep until a time, and the lifecycle events in one order for
# every replica's `WatchModels` (`seq`, written under the `registry.events` row of `leaders`).
registry_workers = Table(
    "registry_workers", SCHEMA,
    Column("worker_id", String(128), primary_key=True),
    Column("address", String(256), nullable=False),
    Column("node", String(256), nullable=False),
    Column("incarnation", String(128), nullable=False),
    Column("metrics_address", String(256), nullable=False),
    Column("last_seen", Double, nullable=False),
)

placements = Table(
    "placements", SCHEMA,
    Column("name", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("worker_id", String(128), nullable=False),
    Column("address", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("detail", String(1024), nullable=False),
    Column("measured_bytes", BigInteger, nullable=False),
    Column("ready_at", Double, nullable=False),
    Column("quantization", String(16), nullable=False),
    Column("expire_time", Double, nullable=True),
    PrimaryKeyConstraint("name", "tag", "worker_id"),
)

drains = Table(
    "drains", SCHEMA,
    Column("name", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("alias", String(256), nullable=False),
    Column("rollback_window", Double, nullable=False),
    Column("start_time", Double, nullable=False),
    Column("idle_time", Double, nullable=True),
    PrimaryKeyConstraint("name", "tag"),
)

model_holds = Table(
    "model_holds", SCHEMA,
    Column("name", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("until", Double, nullable=False),
    PrimaryKeyConstraint("name", "tag"),
)

model_events = Table(
    "model_events", SCHEMA,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("model", String(256), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("worker_id", String(128), nullable=False),
    Column("reason", String(2048), nullable=False),
    Column("time", Double, nullable=False),
)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

# How long a call waits for a connection, seconds; while the store is down calls fail at once.
CONNECT_TIMEOUT = 3.0
# Every PostgreSQL connection: a connect timeout; TCP keepalives, so a peer gone without a word
# (a host down, a dropped route) is found within a minute instead of the kernel's two hours; and
# statement and idle-transaction timeouts, so no statement or forgotten transaction holds rows
# for ever.
POSTGRES_CONNECTION = {"connect_timeout": int(CONNECT_TIMEOUT), "keepalives": 1, "keepalives_idle": 30,
                       "keepalives_interval": 10, "keepalives_count": 3,
                       "options": "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000"}
# While the store is down, one call tries it again after this many seconds, doubling up to MAX_RETRY.
RETRY, MAX_RETRY = 0.5, 4.0
# A call that has waited this long for the store (connection and statements) means it stalls: a
# store that stopped answering without closing its connections (a frozen host, SIGSTOP). While one
# waits that long, every new call fails at once instead of queueing behind it.
STALLED_SECONDS = 3.0


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable store URL>"


class Store:
    """An engine on one URL, with the store's error handling and its schema revision."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise InvalidArgument.field("store_url", f"cannot parse {redact(url)!r} as a database URL") from None
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                # Its owner's only (it holds key hashes and tenants); SQLite gives its journal
                # files the same mode.
                Path(database).touch(mode=0o600, exist_ok=True)
                os.chmod(database, 0o600)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _serialize_sqlite_writers(engine)
        elif self.dialect == "postgresql":
            try:
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=5,
                                       connect_args=POSTGRES_CONNECTION)
            except NoSuchModuleError:
                raise InvalidArgument.field("store_url", "PostgreSQL URLs are postgresql+psycopg://...") from None
        else:
            raise InvalidArgument.field("store_url", f"stores are sqlite:/// or postgresql+psycopg:// URLs, "
                                                     f"not {parsed.drivername!r}")
        self.engine: Engine = engine
        self._down_since: float | None = None
        self._down_reason = ""
        self._retry_in = RETRY
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._waiting: dict[int, float] = {}        # calls in the store now, since when (monotonic)
        self._numbers = itertools.count()

    @property
    def embedded(self) -> bool:
        return self.dialect == "sqlite"

    def close(self) -> None:
        self.engine.dispose()

    # ---- transactions ---------------------------------------------------------------

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; a store that cannot be reached is UNAVAILABLE STORE_UNAVAILABLE.
        While it is down, calls fail at once, but for one attempt every `_retry_in` seconds
        (doubling up to `MAX_RETRY`), whose success brings it back for every caller."""
        now = time.monotonic()
        with self._lock:
            if self._down_since is not None:
                if now < self._retry_at:
                    raise self._unavailable()
                self._retry_at = now + self._retry_in
            self._check_stalled(now)
            call = next(self._numbers)
            self._waiting[call] = now
        try:
            with self.engine.begin() as connection:
                yield connection
        except DBAPIError as exc:
            if isinstance(exc, IntegrityError) or not _is_connection_error(exc, self.dialect):
                raise
            self._mark_down(exc)
            raise self._unavailable() from None
        finally:
            with self._lock:
                del self._waiting[call]
        self._mark_up()

    def put(self, table: Table, values: dict, *key: str) -> None:
        """Writes the row of `table` whose `key` columns hold `values`' (updated, or inserted when
        there is none), in one transaction."""
        where = [table.c[k] == values[k] for k in key]
        try:
            with self.begin() as db:
                if db.execute(update(table).where(*where).values(values)).rowcount == 0:
                    db.execute(insert(table).values(values))
        except IntegrityError:          # another replica inserted it meanwhile: this one replaces it
            with self.begin() as db:
                db.execute(update(table).where(*where).values(values))

    def upsert(self, db: Connection, table: Table, values: dict, *key: str) -> None:
        """Inside transaction `db`: inserts the row of `table` with `values`, or updates the one
        whose `key` columns hold theirs (one statement: no conflict can abort the transaction)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        statement = dialect_insert(table).values(values)
        db.execute(statement.on_conflict_do_update(index_elements=list(key),
                                                   set_={k: v for k, v in values.items() if k not in key}))

    def check_stalled(self) -> None:
        """UNAVAILABLE `STORE_UNAVAILABLE` at once while a call has waited for the store longer
        than STALLED_SECONDS (cheap: on the event loop, before a call is queued behind it)."""
        with self._lock:
            self._check_stalled(time.monotonic())

    def _check_stalled(self, now: float) -> None:
        oldest = min(self._waiting.values(), default=now)
        if now - oldest > STALLED_SECONDS:
            raise Unavailable(f"the store {redact(self.url)} has not answered a call for {now - oldest:.0f} s",
                              reason="STORE_UNAVAILABLE", metadata={"store": redact(self.url)})

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._retry_in = RETRY
            else:
                self._retry_in = min(self._retry_in * 2, MAX_RETRY)
            self._retry_at = time.monotonic() + self._retry_in
            self._down_reason = _first_line(exc)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            with self._lock:
                self._down_since = None

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"the store {redact(self.url)} cannot be reached: {self._down_reason}",
                           reason="STORE_UNAVAILABLE", metadata={"store": redact(self.url)})

    # ---- schema -------------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema revision the store is at; None for an empty store."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head() -> str:
        """The revision this release needs."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(_alembic_config()).get_current_head()

    def migrate(self) -> tuple[str | None, str]:
        """Brings the schema to this release's revision; returns (from, to)."""
        from alembic import command

        before = self.revision()
        config = _alembic_config()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return before, self.head()

    def probe(self) -> str:
        """Why the store cannot serve this release now ("" when it can). Clears `down` when
        the store answers. Blocking: run it off the event loop."""
        try:
            revision = self.revision()
        except DBAPIError as exc:
            self._mark_down(exc)
            return f"cannot be reached: {_first_line(exc)}"
        self._mark_up()
        head = self.head()
        if revision != head:
            if self.embedded:
                self.migrate()
                return ""
            return (f"schema is at revision {revision or 'none'}, this release needs {head}: "
                    f"run `llmos migrate`")
        return ""

    def ready(self) -> Store:
        """Opens an embedded store for use now (migrating it); a cluster store is checked by
        the service's `StoreWatch` instead."""
        if self.embedded:
            problem = self.probe()
            if problem:
                raise Unavailable(f"the store {redact(self.url)} {problem}", reason="STORE_UNAVAILABLE")
        return self

    # ---- leader leases --------------------------------------------------------------------

    def lead(self, name: str, holder: str, ttl: float, now: float | None = None) -> bool:
        """Takes or keeps the leader lease `name` for `holder` for `ttl` seconds; True when
        `holder` leads. The lease is one row; a holder keeps it by calling again before it
        ends, and anyone takes it once it has. Clocks of the replicas are assumed in step
        within a fraction of `ttl` (NTP)."""
        now = time.time() if now is None else now
        try:
            with self.begin() as connection:
                row = connection.execute(select(leaders).where(leaders.c.name == name).with_for_update()).first()
                if row is None:
                    connection.execute(insert(leaders).values(name=name, holder=holder, expire_time=now + ttl))
                    return True
                if row.holder != holder and row.expire_time > now:
                    return False
                connection.execute(update(leaders).where(leaders.c.name == name)
                                   .values(holder=holder, expire_time=now + ttl))
                return True
        except IntegrityError:
            return False                                   # another replica inserted it first

    def resign(self, name: str, holder: str) -> None:
        with self.begin() as connection:
            connection.execute(update(leaders).where(leaders.c.name == name, leaders.c.holder == holder)
                               .values(expire_time=0.0))


class Leadership:
    """Whether this replica runs a cluster-wide loop now, renewed on each `check`."""

    def __init__(self, store: Store, name: str, holder: str, ttl: float) -> None:
        self.store, self.name, self.holder, self.ttl = store, name, holder, ttl
        self.leading = False

    def check(self) -> tuple[bool, bool]:
        """(leads now, took the lead just now). A store that cannot be reached leads nobody."""
        try:
            leads = self.store.lead(self.name, self.holder, self.ttl)
        except Unavailable:
            leads = False
        took = leads and not self.leading
        if leads != self.leading:
            log.info("%s %s the lead of %s", self.holder, "took" if leads else "lost", self.name)
        self.leading = leads
        return leads, took

    def resign(self) -> None:
        """Gives the lead up at once (at stop), so another replica need not wait out its TTL."""
        if self.leading:
            self.leading = False
            try:
                self.store.resign(self.name, self.holder)
            except Unavailable:
                pass


# The longest a server's handler waits for one store call made off its event loop, seconds.
CALL_SECONDS = 2.0
_CALL_THREADS: ThreadPoolExecutor | None = None


async def off_loop(fn: Callable[..., T], *args: Any, timeout: float = CALL_SECONDS,
                   executor: ThreadPoolExecutor | None = None) -> T:
    """`fn(*args)` (store calls) on a thread of the store's own pool (or of `executor`: one thread
    keeps a service's calls in the order they came, as its event loop did), waited for at most
    `timeout`: a stalled or half-open store never holds the event loop, and a call it does not
    answer in time is UNAVAILABLE (STORE_UNAVAILABLE) while the thread waits it out."""
    global _CALL_THREADS
    if executor is None:
        if _CALL_THREADS is None:
            _CALL_THREADS = ThreadPoolExecutor(8, thread_name_prefix="llmos-store")
        executor = _CALL_THREADS
    call = asyncio.wrap_future(executor.submit(fn, *args))
    call.add_done_callback(lambda done: done.cancelled() or done.exception())   # (heard, if nobody waits)
    try:
        return await asyncio.wait_for(asyncio.shield(call), timeout)
    except TimeoutError:
        raise Unavailable(f"the store did not answer within {timeout:g} s", reason="STORE_UNAVAILABLE") from None


class Journal:
    """Writes a service's changes to the store in the order they happen, a batch per transaction
    on a thread of its own (`executor`), so its event loop never waits for the store: while the
    store cannot be reached, the batch waits and is written when it is back. A subclass writes
    a batch (`write`) and may add work of its own to each (`due`). Reads made on `executor`
    after `flush` see every change added before it."""

    def __init__(self, store: Store, name: str, interval: float = 0.05) -> None:
        self.store = store
        self.interval = interval
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"llmos-{name}")
        self._name = name
        self._pending: list[tuple] = []
        self._wake = asyncio.Event()
        self._writing: asyncio.Future | None = None
        self._flushing = asyncio.Lock()
        self.open = True

    def add(self, op: tuple) -> None:
        if self.open:
            self._pending.append(op)
            self._wake.set()

    def write(self, db: Connection, ops: list[tuple]) -> None:
        raise NotImplementedError

    def due(self) -> list[tuple]:
        """Work to add to the next batch (a sweep now and then)."""
        return []

    def _write(self, ops: list[tuple]) -> None:
        with self.store.begin() as db:
            self.write(db, ops)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Writes what is pending; False if the store did not take it within `timeout` (what
        failed stays pending; a batch still being written when the time ran out is not written
        again unless it fails, and nothing after it starts before it ends)."""
        async with self._flushing:
            if self._writing is not None and not self._writing.done():
                await asyncio.wait([self._writing], timeout=timeout)
                if not self._writing.done():
                    return False
            ops, self._pending = self._pending, []
            ops += self.due()
            if not ops:
                return True
            writing = self._writing = asyncio.wrap_future(self.executor.submit(self._write, ops))
            writing.add_done_callback(lambda done: self._settle(done, ops))
            await asyncio.wait([writing], timeout=timeout)
            return writing.done() and writing.exception() is None

    def _settle(self, done: asyncio.Future, ops: list[tuple]) -> None:
        """A batch's transaction ended: if it failed (rolled back), its ops go back first in line."""
        exc = None if done.cancelled() else done.exception()
        if exc is not None and self.open:
            (log.debug if isinstance(exc, Unavailable) else log.warning)("%s not written yet: %s", self._name, exc)
            self._pending[:0] = ops
            self._wake.set()

    async def read(self, fn: Callable[..., T], *args: Any, timeout: float = CALL_SECONDS) -> T:
        """`fn(*args)` on the journal's thread, after what is pending was written."""
        self.store.check_stalled()
        if not await self.flush(timeout):
            raise Unavailable(f"the store did not take this service's changes within {timeout:g} s",
                              reason="STORE_UNAVAILABLE")
        return await off_loop(fn, *args, timeout=timeout, executor=self.executor)

    async def run(self) -> None:
        backoff = self.interval
        while self.open:
            await self._wake.wait()
            self._wake.clear()
            if await self.flush():
                backoff = self.interval
            else:
                backoff = min(backoff * 2, 2.0)
                self._wake.set()
            await asyncio.sleep(backoff)

    def drop(self) -> None:
        """Writes nothing more."""
        self.open = False
        self._pending.clear()
        self._wake.set()

    def close(self) -> None:
        self.executor.shutdown(wait=False)


class StoreMutex:
    """Locks shared by a service's replicas: a leader lease in the store (`Store.lead`) held for as
    long as a block runs and renewed every third of its TTL, so that a replica that dies holding
    one frees it within the TTL. One holder per replica; inside a replica an asyncio lock per name
    queues its own callers."""

    def __init__(self, store: Store, holder: str, ttl: float = 10.0, poll: float = 0.1) -> None:
        self.store, self.holder, self.ttl, self.poll = store, holder, ttl, poll
        self._local: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str, wait: float = 300.0):
        """Holds lock `name` for the block; waits for another replica's hold at most `wait`
        seconds (UNAVAILABLE `LOCK_BUSY` after that), and fails at once while the store is down."""
        local = self._local.setdefault(name, asyncio.Lock())
        async with local:
            deadline = time.monotonic() + wait
            while not await off_loop(self.store.lead, name, self.holder, self.ttl):
                if time.monotonic() > deadline:
                    raise Unavailable(f"{name} is held by another replica for more than {wait:g} s",
                                      reason="LOCK_BUSY", metadata={"lock": name})
                await asyncio.sleep(self.poll)
            renewal = asyncio.ensure_future(self._renew(name))
            try:
                yield
            finally:
                renewal.cancel()
                with contextlib.suppress(Exception):
                    await off_loop(self.store.resign, name, self.holder)

    async def _renew(self, name: str) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await off_loop(self.store.lead, name, self.holder, self.ttl):
                    log.warning("%s lost lock %s while holding it (not renewed within %g s): another replica "
                                "may act on it too", self.holder, name, self.ttl)
            except Unavailable:
                log.debug("could not renew lock %s: the store is unavailable", name)


class StoreWatch:
    """Keeps a service's health in step with its store: NOT_SERVING (with one log line) while
    the store cannot be reached or is behind on migrations, SERVING again when it is back,
    trying again with backoff from `interval` up to `max_interval`. A service that was serving
    goes on serving through an outage shorter than `grace` seconds (a stalled or restarting
    database: what needs the store is UNAVAILABLE meanwhile, the rest is served, and readiness
    does not flap every replica out of its Service at once)."""

    def __init__(self, store: Store, set_serving: Callable[[bool], object],
                 interval: float = 1.0, max_interval: float = 8.0, grace: float = 15.0) -> None:
        self.store = store
        self._set_serving = set_serving
        self.interval, self.max_interval, self.grace = interval, max_interval, grace
        self.problem = ""
        self._serving = True            # (a host serves once started)
        self._served = False            # it has had its store at least once
        self._unreachable_since: float | None = None

    async def check(self) -> str:
        problem = await asyncio.to_thread(self.store.probe)
        now = time.monotonic()
        outage = bool(problem) and _kind(problem) == "cannot be reached"
        self._unreachable_since = (self._unreachable_since or now) if outage else None
        riding = outage and self._served and now - self._unreachable_since < self.grace
        serve = not problem or riding
        if problem and _kind(problem) != _kind(self.problem):     # one line per kind of trouble
            if riding:
                log.warning("store %s %s; serving what needs no store for up to %.0f s", redact(self.store.url),
                            problem, self.grace)
            else:
                log.error("store %s %s; not serving until it is back, trying again with backoff",
                          redact(self.store.url), problem)
        elif problem and not serve and self._serving:
            log.error("store %s %s for %.0f s; not serving until it is back", redact(self.store.url), problem,
                      now - self._unreachable_since)
        elif not problem and self.problem:
            log.info("store %s is back; serving", redact(self.store.url))
        if serve != self._serving:
            result = self._set_serving(serve)
            if asyncio.iscoroutine(result):
                await result
            self._serving = serve
        self._served = self._served or not problem
        self.problem = problem
        return problem

    async def run(self, address: str = "") -> None:
        """Checks for ever (a service's background loop: `address` is not needed)."""
        delay = self.interval
        while True:
            delay = min(delay * 2, self.max_interval) if await self.check() else self.interval
            await asyncio.sleep(delay)


def _kind(problem: str) -> str:
    """"cannot be reached", "schema is at revision ...": a problem without its details."""
    return problem.split(":", 1)[0]


def _serialize_sqlite_writers(engine: Engine) -> None:
    """SQLite: WAL, and every transaction takes the write lock when it begins (BEGIN
    IMMEDIATE), so that a read-then-write (a budget check, a leader lease) is atomic across
    processes sharing the file. The pattern SQLAlchemy documents for pysqlite."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_connection_error(exc: DBAPIError, dialect: str) -> bool:
    if exc.connection_invalidated:
        return True
    if dialect == "postgresql":
        import psycopg

        if not isinstance(exc.orig, psycopg.OperationalError | psycopg.InterfaceError):
            return False
        # Not a deadlock, a serialization failure or a timeout of one statement (the server
        # answered): no SQLSTATE (no connection at all), connection exceptions (class 08), the
        # server shutting down (57P01-57P03), too many connections (53300).
        state = getattr(exc.orig, "sqlstate", None)
        return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03", "53300"}
    return "unable to open database" in str(exc.orig) or "disk I/O error" in str(exc.orig)


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", exc)
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


def _alembic_config():
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


__all__ = ["SCHEMA", "Journal", "Leadership", "Store", "StoreMutex", "StoreWatch", "api_keys", "devices", "drains",
           "leaders", "leases", "model_events", "model_holds", "models", "placements", "redact", "registry_workers",
           "sqlite_url", "tenants"]
