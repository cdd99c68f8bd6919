"""Several scheduler processes, one leading: a leader lease in the store, hot standbys.

The leader renews the lease (`Store.lead`) every third of its TTL. A standby answers every call
with UNAVAILABLE `NOT_LEADER`, naming the leader's address, and takes the lease once it has
expired (its holder died) or was given up (its holder stopped). Taking over, it

1. starts a fresh `AdmissionControl`, paused: requests queue but none is dispatched;
2. counts what each tenant used in the last window from the charges the leaders wrote to the
   store (`ChargeJournal`), so a failover cannot be used to pass a quota;
3. reads where every model is ready from the registry and polls those workers: the generations
   they serve that it did not admit hold their slots until they end;
4. after `recovery` seconds, in which the gateways re-submit the requests that waited at the
   previous leader (with the time they waited: they keep their places), starts dispatching.

A request admitted or queued is so never lost to a leader's death, only delayed: one that was
running goes on (its stream is between its gateway and its worker), and its end, reported to
the new leader, frees its slot and settles its charge; one that waited is submitted again by its
gateway, which never streamed it, so nothing runs twice.

A leader that cannot reach the store keeps leading (no other replica can take the lease while
the store is down); one that finds another holder at its next renewal stops leading. A leader
that stops (SIGTERM) hands over: it refuses its waiting requests with NOT_LEADER (their gateways
re-submit them), writes its last charges and gives the lease up, so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, insert, select, update

from llmos.common.errors import Unavailable
from llmos.common.store import Journal, Store, leaders, off_loop, quota_charges

from .admission import AdmissionControl, NotLeader
from .quotas import WINDOW, KeptCharge

log = logging.getLogger(__name__)

LEASE = "scheduler.leader"


class ChargeJournal(Journal):
    """Writes a leader's quota charges to the store in the order they happen, a batch per
    transaction on a thread of its own, so admission never waits for the store: while the store
    cannot be reached, the batch waits and is written when it is back."""

    def __init__(self, store: Store, interval: float = 0.05) -> None:
        super().__init__(store, "quota charges", interval)
        self._last_sweep = 0.0

    def reserved(self, request_id: str, tenant: str, start: float, tokens: int) -> None:
        self.add(("reserve", request_id, tenant, start, tokens))

    def settled(self, request_id: str, end: float, tokens: int) -> None:
        self.add(("settle", request_id, end, tokens))

    def released(self, request_id: str) -> None:
        self.add(("release", request_id))

    def load(self) -> list[KeptCharge]:
        """The charges of the last window and those still running (blocking: off the loop)."""
        with self.store.begin() as db:
            rows = db.execute(select(quota_charges).where(
                (quota_charges.c.end_time.is_(None)) | (quota_charges.c.end_time > time.time() - WINDOW))).all()
        return [KeptCharge(r.request_id, r.tenant, r.start_time, r.end_time, r.tokens) for r in rows]

    def due(self) -> list[tuple]:
        if time.monotonic() - self._last_sweep <= 10.0:
            return []
        self._last_sweep = time.monotonic()
        return [("sweep", "")]

    def write(self, db, ops: list[tuple]) -> None:
        for op in ops:
            kind, request_id = op[0], op[1]
            where = quota_charges.c.request_id == request_id
            if kind == "reserve":
                db.execute(delete(quota_charges).where(where))
                db.execute(insert(quota_charges).values(request_id=request_id, tenant=op[2], start_time=op[3],
                                                        end_time=None, tokens=op[4]))
            elif kind == "settle":
                db.execute(update(quota_charges).where(where).values(end_time=op[2], tokens=op[3]))
            elif kind == "release":
                db.execute(delete(quota_charges).where(where))
            else:       # what left the window, and what a dead leader left running a day ago
                now = time.time()
                db.execute(delete(quota_charges).where(quota_charges.c.end_time < now - WINDOW))
                db.execute(delete(quota_charges).where(quota_charges.c.end_time.is_(None),
                                                       quota_charges.c.start_time < now - 86400))


class Replica:
    """This scheduler process among its replicas: whether it leads, and its `AdmissionControl`
    while it does. Without a store (one scheduler) it always leads."""

    def __init__(self, make: Callable[[], AdmissionControl], store: Store | None = None, ttl: float = 3.0,
                 recovery: float = 1.0, advertise: str = "",
                 learn: Callable[[AdmissionControl], Awaitable[None]] | None = None) -> None:
        self._make = make
        self.store = store
        self.ttl = ttl
        self.recovery = recovery
        self.advertise = advertise
        self._learn = learn
        self.holder = ""
        self.leader = ""                  # the leader's address, as the store last said
        self.admission: AdmissionControl | None = None if store is not None else make()
        self.journal: ChargeJournal | None = None
        self._journal_task: asyncio.Task | None = None
        self._recovering: asyncio.Task | None = None
        self.took_over_at: float | None = None        # monotonic, the last time it took the lead
        self.resumed_at: float | None = None          # ... and when it started dispatching again
        self.stopping = False
        self._lock = asyncio.Lock()       # a renewal and a hand-over never cross

    @property
    def leads(self) -> bool:
        return self.admission is not None

    def current(self) -> AdmissionControl:
        """The admission control of the leader, or NOT_LEADER naming the leader."""
        if self.admission is None:
            raise NotLeader("" if self.leader == self.holder else self.leader)
        return self.admission

    async def run(self, address: str) -> None:
        """Keeps (or waits for) the lead; a background loop of the service."""
        if self.store is None:
            return
        self.holder = self.advertise or address
        period = self.ttl / 3
        while True:
            async with self._lock:
                if self.stopping:
                    break
                try:
                    leads = await off_loop(self.store.lead, LEASE, self.holder, self.ttl, timeout=period)
                except Exception as exc:  # noqa: BLE001 - cannot tell: nobody can take the lease meanwhile
                    log.debug("cannot renew the scheduler lease: %s", exc)
                    leads = None
                if leads and self.admission is None:     # (under the lock: a hand-over waits for it)
                    await self._take_over()
            if leads is False:
                if self.admission is not None:
                    log.warning("another scheduler took the lead: this one stops leading")
                    self._step_down()
                try:
                    self.leader = await off_loop(self._leader_now, timeout=period) or self.leader
                except Unavailable:
                    pass
            await asyncio.sleep(period)

    def _leader_now(self) -> str:
        with self.store.begin() as db:
            row = db.execute(select(leaders).where(leaders.c.name == LEASE)).first()
        return row.holder if row is not None and row.expire_time > time.time() else ""

    async def _take_over(self) -> None:
        started = time.monotonic()
        log.info("%s took the scheduler lead: learning the slots in use and the quota windows", self.holder)
        self.leader = self.holder
        self.journal = ChargeJournal(self.store)
        admission = self._make()
        admission.paused = True
        try:
            charges = await off_loop(self.journal.load, timeout=self.ttl)
        except Unavailable as exc:
            log.warning("cannot read the quota charges (%s): giving the lead up", exc.reason)
            await self._resign()
            return
        admission.quotas.restore(charges)
        admission.quotas.log = self.journal
        self.admission = admission
        self.took_over_at = started
        self._journal_task = asyncio.create_task(self.journal.run())
        self._recovering = asyncio.create_task(self._recover(admission, started, len(charges)))

    async def _recover(self, admission: AdmissionControl, started: float, charges: int) -> None:
        try:
            if self._learn is not None:
                await self._learn(admission)
        except Exception:  # noqa: BLE001 - the reports go on learning in the background
            log.exception("learning the slots in use failed; dispatching with what the reports tell")
        await asyncio.sleep(max(0.0, self.recovery - (time.monotonic() - started)))
        if self.admission is admission:
            inherited = sum(len(w.inherited) for w in admission.rotation.workers.values())
            admission.resume()
            self.resumed_at = time.monotonic()
            log.info("leading after %.2f s: %d generations of the previous leader running, %d quota charges "
                     "counted, %d requests waiting", self.resumed_at - started, inherited, charges,
                     admission.waiting)

    def _step_down(self, leader: str = "") -> None:
        admission, self.admission = self.admission, None
        if self._recovering is not None:
            self._recovering.cancel()
        if admission is not None:
            admission.close(leader)
        if self.journal is not None:
            self.journal.drop()

    async def _resign(self) -> None:
        try:
            await off_loop(self.store.resign, LEASE, self.holder, timeout=self.ttl)
        except Unavailable:
            pass

    async def hand_over(self) -> None:
        """At stop, before draining: stops leading, so a standby takes the lead at once."""
        self.stopping = True
        async with self._lock:
            if self.store is None or self.admission is None:
                return
            admission = self.admission
            self.admission = None
            if self._recovering is not None:
                self._recovering.cancel()
            admission.close()
            for _ in range(3):      # the refused requests' releases reach the journal
                await asyncio.sleep(0)
            if self.journal is not None:
                await self.journal.flush()
                self.journal.drop()
            await self._resign()
        log.info("%s handed the scheduler lead over", self.holder)

    async def close(self) -> None:
        for task in (self._journal_task, self._recovering):
            if task is not None:
                task.cancel()
        if self.journal is not None:
            self.journal.close()
