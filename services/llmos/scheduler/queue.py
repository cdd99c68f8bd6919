"""The scheduler's core: admission, the wait for room, routing, and accounting.

A request is admitted when a worker that serves its model, and is in rotation,
has a free slot: its capacity is what the worker last reported for that model
(capped by `slots_per_worker`), its use is the scheduler's own count of the
requests it sent there and that have not finished, which is exact. Otherwise the
request waits in its model's `FairQueue` (bands, tenant fairness, deadlines,
aging) until a slot frees, its deadline passes or its caller goes away. Past the
queue limits, new requests are refused at once with an estimate of when to retry.

Among workers with a free slot the least loaded gets the request, unless the request's prefix
key (a hash of how its input starts, from the gateway) last went to another that is at most
`affinity_slack` of its slots busier: that worker's prefix cache likely holds the prompt's
start (the earlier turns of the conversation), which it then need not compute again.

A worker leaves rotation when a stream on it fails or it has not answered a
status poll for `report_timeout` seconds, and comes back with its next good
report. A request whose worker failed before its first token is admitted again
ahead of everything else (`Ticket.redispatch`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.common.domain import DEFAULT_MAX_TOKENS, QueueDepth
from llmos.common.errors import AlreadyExists, DeadlineExceeded, ResourceExhausted, Unavailable
from llmos.common.keystore import Quota
from llmos.common.names import parse_model_ref

from .fairness import FairQueue, Waiting
from .quotas import QuotaBook

log = logging.getLogger(__name__)

# Band offset of re-dispatched requests: above every client band.
REDISPATCH_BAND = 1000
# Finished requests remembered for GetRequestStatus.
REMEMBERED_DONE = 10_000
# Prefix keys remembered with the worker that served them last.
REMEMBERED_PREFIXES = 8192


@dataclass(frozen=True)
class Endpoint:
    worker_id: str
    address: str


class RegistryPort(Protocol):
    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        """(resolved "name:tag", workers where it is ready); raises NotFound if not in the catalog."""

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None,
                   hold: bool = False) -> list[Endpoint]:
        """Loads the model somewhere (cold start), or just sets its keep-alive (or, with `hold`,
        holds it loaded that long) when it is loaded already; returns where it is ready."""


@dataclass(frozen=True)
class Ticket:
    """What the scheduler needs to know of a request."""

    request_id: str
    model: str
    tenant: str = "default"
    priority: int = 0
    prompt_tokens: int = 0           # an estimate, for the fair-queuing cost
    max_tokens: int = 0              # 0: not set
    keep_alive: float | None = None
    redispatch: bool = False         # its worker failed before the first token
    keep_alive_hold: bool = False    # keep_alive only holds the model loaded (a user's request)
    weight: float = 1.0              # its tenant's fair-share weight, from the tenant's record
    quota: Quota = Quota()           # its tenant's limits, from the tenant's record
    prefix_key: int = 0              # a hash of how its input starts (0: none), for prefix affinity

    @property
    def cost(self) -> int:
        return self.prompt_tokens + (self.max_tokens or DEFAULT_MAX_TOKENS)

    @property
    def band(self) -> int:
        """Its queue band: its priority, above every client band when re-dispatched."""
        return self.priority + (REDISPATCH_BAND if self.redispatch else 0)


@dataclass(frozen=True)
class Admission:
    request_id: str
    model: str
    endpoint: Endpoint
    queue_seconds: float


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    phase: Phase
    model: str
    tenant: str
    priority: int
    position: int = 0                # 1-based place in its model's queue, when queued
    reason: str = ""                 # why it waits, or how it ended
    endpoint: Endpoint | None = None
    queue_seconds: float = 0.0
    start_time: float | None = None  # Unix time it left the queue, if it did


@dataclass(frozen=True)
class WorkerLoad:
    endpoint: Endpoint
    model: str
    running: int
    capacity: int
    in_rotation: bool


class SchedulerEvents:
    """What the scheduler tells its telemetry; this base ignores it. `admitted` and
    `refused` run in the admitting caller's own task (its trace context is current)."""

    def admitted(self, request: _Request) -> None:
        """The request got a slot (`request.endpoint`) after `request.started - request.arrival`."""

    def refused(self, request: _Request, outcome: str) -> None:
        """The request never ran: refused, timed out in the queue, or its caller left."""

    def finished(self, request: _Request, outcome: str) -> None:
        """A running request ended and its slot is free."""


@dataclass
class _Request:
    ticket: Ticket
    model: str
    arrival: float
    arrival_wall: float = field(default_factory=time.time)
    depth_on_arrival: int = 0           # requests already waiting for its model when it queued
    route: tuple[int, int, int] = (0, 0, 0)   # at its start: its worker's use and capacity, workers in rotation
    phase: Phase = Phase.QUEUED
    reason: str = "RESOLVING_MODEL"
    waiting: Waiting | None = None
    future: asyncio.Future | None = None
    endpoint: Endpoint | None = None
    started: float = 0.0
    start_time: float | None = None     # the same moment as Unix time, for callers
    abandoned: bool = False
    missing_since: float | None = None  # running, but absent from its worker's reports since


@dataclass
class _Worker:
    endpoint: Endpoint
    capacity: dict[str, int] = field(default_factory=dict)      # model → slots, as reported
    running: Counter[str] = field(default_factory=Counter)      # model → requests sent here
    last_report: float | None = None
    out_since: float | None = None                              # out of rotation since
    listed_since: dict[str, float] = field(default_factory=dict)  # model → since the registry lists it here
    denied: dict[str, float] = field(default_factory=dict)        # model → when it said it does not hold it


@dataclass
class _Model:
    name: str
    queue: FairQueue
    endpoints: list[Endpoint] = field(default_factory=list)
    endpoints_at: float = float("-inf")                         # when the registry said so
    mean_seconds: float = 1.0                                   # moving average of a generation


class Scheduler:
    def __init__(self, registry: RegistryPort, slots_per_worker: int = 16, max_queue: int = 64,
                 max_queue_per_model: int = 0, aging_seconds: float = 30.0, report_timeout: float = 3.0,
                 placement_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 events: SchedulerEvents | None = None, orphan_grace: float = 5.0,
                 affinity_slack: float = 0.25) -> None:
        self._registry = registry
        self.events = events or SchedulerEvents()
        self.slots_per_worker = slots_per_worker
        self.max_queue = max_queue
        self.max_queue_per_model = max_queue_per_model or max_queue
        self.aging_seconds = aging_seconds
        self.report_timeout = report_timeout
        self.placement_ttl = placement_ttl
        self.orphan_grace = orphan_grace
        self.affinity_slack = affinity_slack
        self._affinity: OrderedDict[tuple[str, int], str] = OrderedDict()   # (model, prefix key) → worker id
        self._aliases: dict[str, str] = {}                      # "tiny" → "tiny:latest"
        self._abandoned: OrderedDict[str, float] = OrderedDict()  # finished before they were admitted
        self._weights: dict[str, float] = {}                     # tenant → weight, as its requests say
        self._clock = clock
        self.quotas = QuotaBook(clock)
        self._models: dict[str, _Model] = {}
        self._workers: dict[str, _Worker] = {}
        self._active: dict[str, _Request] = {}
        self._done: OrderedDict[str, RequestStatus] = OrderedDict()
        self.admitted_total = 0
        self.admitted_by_tenant: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    # ---- figures -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for r in self._active.values() if r.phase is Phase.RUNNING)

    @property
    def waiting(self) -> int:
        return sum(len(m.queue) for m in self._models.values())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def queue_depths(self) -> list[QueueDepth]:
        return [QueueDepth(m.name, band if band < REDISPATCH_BAND // 2 else band - REDISPATCH_BAND, tenant, n)
                for m in self._models.values() for (band, tenant), n in sorted(m.queue.depths().items())]

    def worker_loads(self) -> list[WorkerLoad]:
        pairs = {(e.worker_id, m.name) for m in self._models.values() for e in m.endpoints}
        pairs |= {(w.endpoint.worker_id, model) for w in self._workers.values() for model, n in w.running.items() if n}
        return [WorkerLoad(self._workers[wid].endpoint, model, self._workers[wid].running[model],
                           self._capacity(self._workers[wid], model), self._workers[wid].out_since is None)
                for wid, model in sorted(pairs) if wid in self._workers]

    def status(self, request_id: str) -> RequestStatus | None:
        request = self._active.get(request_id)
        if request is None:
            return self._done.get(request_id)
        t = request.ticket
        position, queued = 0, request.started - request.arrival
        if request.phase is Phase.QUEUED:
            queued = self._clock() - request.arrival
            if request.waiting is not None:
                model = self._models[request.model]
                position = next(i for i, rid in enumerate(model.queue.order(self._clock()), 1) if rid == request_id)
        return RequestStatus(request_id, request.phase, request.model or t.model, t.tenant, t.priority, position,
                             request.reason if request.phase is Phase.QUEUED else "", request.endpoint, queued,
                             request.start_time)

    def retry_after(self, model: str) -> float:
        """An honest guess of when a request sent now would get a slot: the queue ahead of
        it, served at the measured pace of the model's workers."""
        known = self._models.get(model)
        if known is None:
            return 1.0
        capacity = sum(self._capacity(worker, model) for worker in self._in_rotation(known))
        return max(0.1, known.mean_seconds * (len(known.queue) + 1) / max(1, capacity))

    # ---- requests --------------------------------------------------------------------------

    async def admit(self, ticket: Ticket, timeout: float | None = None) -> Admission:
        """Admits a generation, waiting at most `timeout` seconds (the caller's deadline)."""
        arrival = self._clock()
        deadline = None if timeout is None else arrival + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - self._clock())

        if ticket.request_id in self._active:
            raise AlreadyExists(f"request {ticket.request_id!r} is already admitted",
                                reason="DUPLICATE_REQUEST_ID", metadata={"request_id": ticket.request_id})
        parse_model_ref(ticket.model)
        if not 0 < ticket.weight <= 1000:
            raise ValueError(f"tenant weight must be more than 0 and at most 1000, got {ticket.weight}")
        request = self._active[ticket.request_id] = _Request(ticket, "", arrival)
        self._done.pop(ticket.request_id, None)
        try:
            self._weights[ticket.tenant] = ticket.weight
            self.quotas.reserve(ticket.tenant, ticket.quota, ticket.request_id, ticket.cost)
            cached = self._cached(ticket.model) if ticket.keep_alive is None else None
            if cached is not None:
                resolved, endpoints = cached.name, cached.endpoints
            else:
                resolved, endpoints = await self._registry.ready_endpoints(ticket.model, remaining())
                self._aliases[ticket.model] = resolved
            request.model = resolved
            loaded = False
            if not self._held_somewhere(resolved, endpoints) or ticket.keep_alive is not None:
                request.reason = "MODEL_LOADING"
                endpoints = await self._registry.load(resolved, remaining(), ticket.keep_alive,
                                                      ticket.keep_alive_hold)
                if not endpoints:
                    raise Unavailable(f"no worker serves {resolved}", reason="NO_READY_WORKER",
                                      metadata={"model": resolved})
                loaded = True
            model = self._model(resolved)
            if cached is None or loaded:
                self.update_endpoints(resolved, endpoints, dispatch=False)
            given_up = self._abandoned.pop(ticket.request_id, None)
            if request.abandoned or (given_up is not None and self._clock() - given_up < 30.0):
                raise asyncio.CancelledError()
            endpoint = self._free_endpoint(model, ticket.prefix_key) if not model.queue else None
            if endpoint is None:
                endpoint = await self._wait(request, model, deadline, remaining())
            else:
                self._start(request, endpoint)
        except BaseException as exc:
            if request.phase is Phase.RUNNING:       # a slot was handed over as the caller left
                self.finish(ticket.request_id, outcome="CANCELLED")
            else:
                self.quotas.release(ticket.tenant, ticket.request_id)
                self._retire(request, _outcome(exc))
                self.events.refused(request, _outcome(exc))
            raise
        self.admitted_total += 1
        self.admitted_by_tenant[ticket.tenant] += 1
        self.events.admitted(request)
        return Admission(ticket.request_id, request.model, endpoint, request.started - arrival)

    def finish(self, request_id: str, tokens: int | None = None, outcome: str = "FINISHED",
               worker_failed: bool = False, model_not_loaded: bool = False) -> bool:
        """Releases a running generation's slot. `tokens`: what it really cost (prompt +
        generated), to correct its tenant's charge; `worker_failed`: its worker broke the
        stream, so it leaves rotation; `model_not_loaded`: its worker does not hold the model,
        so it gets no more of its requests until it reports holding it. Idempotent."""
        request = self._active.get(request_id)
        if request is None or request.phase is Phase.QUEUED:
            # The caller gave up before it heard of its admission: whatever is granted later
            # is given back at once.
            self._abandon(request_id, request)
            return False
        if request.phase is not Phase.RUNNING:
            return False
        now = self._clock()
        model = self._models[request.model]
        worker = self._workers.get(request.endpoint.worker_id)
        if worker is not None:
            worker.running[request.model] -= 1
            if model_not_loaded:
                worker.capacity.pop(request.model, None)
                worker.denied[request.model] = now
                log.warning("worker %s does not hold %s: no requests for it go there until it reports it",
                            worker.endpoint.worker_id, request.model)
            if worker_failed and worker.out_since is None:
                worker.out_since = now
                log.warning("worker %s at %s out of rotation: a stream on it failed",
                            worker.endpoint.worker_id, worker.endpoint.address)
        if tokens is not None:
            model.queue.charge(request.ticket.tenant, request.ticket.band, tokens - request.ticket.cost)
        self.quotas.settle(request.ticket.tenant, request_id, tokens)
        if not worker_failed:
            model.mean_seconds = 0.9 * model.mean_seconds + 0.1 * (now - request.started)
        self._retire(request, outcome)
        self.events.finished(request, outcome)
        self._dispatch(model)
        return True

    def _abandon(self, request_id: str, request: _Request | None) -> None:
        if request is None:
            self._abandoned[request_id] = self._clock()
            while len(self._abandoned) > REMEMBERED_DONE:
                self._abandoned.popitem(last=False)
            return
        request.abandoned = True
        if request.waiting is not None and self._models[request.model].queue.remove(request.waiting):
            request.future.cancel()     # out of the queue now: no dispatch may hand it a slot

    # ---- workers ----------------------------------------------------------------------------

    def update_endpoints(self, model: str, endpoints: list[Endpoint], dispatch: bool = True) -> None:
        """Where the registry says `model` is ready now."""
        known = self._model(model)
        now = self._clock()
        known.endpoints, known.endpoints_at = list(endpoints), now
        listed = {e.worker_id for e in endpoints}
        for worker in self._workers.values():
            if worker.endpoint.worker_id not in listed:
                worker.listed_since.pop(model, None)
        for e in endpoints:
            if e.worker_id not in self._workers or self._workers[e.worker_id].endpoint != e:
                previous = self._workers.get(e.worker_id)
                self._workers[e.worker_id] = _Worker(e, running=previous.running if previous else Counter())
            worker = self._workers[e.worker_id]
            since = worker.listed_since.setdefault(model, now)
            # Listed since the worker's last report: slots until its next report says how many. A
            # worker that reported after that without the model does not hold it (whatever the
            # registry still says): no slots, so no request is sent there to fail.
            if (worker.last_report is None or worker.last_report < since) and worker.denied.get(model, -1.0) < since:
                worker.capacity.setdefault(model, self.slots_per_worker)
        if dispatch:
            self._dispatch(known)

    def report(self, worker_id: str, capacity: dict[str, int], serving: set[str] | None = None) -> None:
        """A worker's status poll answered: its slots per loaded model and the requests it serves.
        A request running there that the worker has not known for `orphan_grace` seconds (its
        gateway died before it could say the request ended) gets its slot back."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        if serving is not None:
            self._reconcile(worker_id, serving)
        worker.capacity = dict(capacity)
        worker.last_report = self._clock()
        for model in capacity:
            worker.denied.pop(model, None)
        if worker.out_since is not None:
            log.info("worker %s back in rotation", worker_id)
            worker.out_since = None
        for model in self._models.values():
            if any(e.worker_id == worker_id for e in model.endpoints):
                self._dispatch(model)

    def _reconcile(self, worker_id: str, serving: set[str]) -> None:
        now = self._clock()
        orphans = []
        for request in self._active.values():
            if request.phase is not Phase.RUNNING or request.endpoint.worker_id != worker_id:
                continue
            if request.ticket.request_id in serving:
                request.missing_since = None
            elif request.missing_since is None:
                request.missing_since = now
            elif now - request.missing_since >= self.orphan_grace and now - request.started >= self.orphan_grace:
                orphans.append(request.ticket.request_id)
        for request_id in orphans:
            log.warning("request %s holds a slot on worker %s, which has not known it for %.1fs: freed",
                        request_id, worker_id, self.orphan_grace)
            self.finish(request_id, outcome="ORPHANED")

    def unreachable(self, worker_id: str) -> None:
        """A status poll of the worker failed."""
        worker = self._workers.get(worker_id)
        if worker is None or worker.out_since is not None:
            return
        now = self._clock()
        if worker.last_report is None or now - worker.last_report >= self.report_timeout:
            worker.out_since = now
            log.warning("worker %s at %s out of rotation: no report for %.1fs", worker_id,
                        worker.endpoint.address, self.report_timeout)

    def workers(self) -> list[Endpoint]:
        return [w.endpoint for w in self._workers.values()]

    def starved_models(self) -> list[str]:
        """Models with waiting requests and no worker in rotation that holds them (by its own
        report): their placements need a fresh look, and a load if there are none."""
        return [m.name for m in self._models.values()
                if m.queue and not any(self._holds(w, m.name) for w in self._in_rotation(m))]

    def _holds(self, worker: _Worker, model: str) -> bool:
        return self._capacity(worker, model) > 0

    def _held_somewhere(self, model: str, endpoints: list[Endpoint]) -> bool:
        """Whether any of the registry's `endpoints` may hold `model`: one not known yet, or
        one with slots for it (it has not said, by report or refusal, that it does not)."""
        return any((worker := self._workers.get(e.worker_id)) is None or worker.endpoint != e
                   or self._holds(worker, model) for e in endpoints)

    # ---- inside ----------------------------------------------------------------------------

    def _cached(self, name: str) -> _Model | None:
        """The model `name` resolves to, when the registry was asked about it in the last
        `placement_ttl` seconds and it had a worker then."""
        model = self._models.get(self._aliases.get(name, ""))
        if model is None or not model.endpoints or self._clock() - model.endpoints_at > self.placement_ttl:
            return None
        return model

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            queue = FairQueue(lambda tenant: self._weights.get(tenant, 1.0), self.aging_seconds)
            model = self._models[name] = _Model(name, queue)
        return model

    def _capacity(self, worker: _Worker, model: str) -> int:
        return min(worker.capacity.get(model, 0), self.slots_per_worker)

    def _in_rotation(self, model: _Model) -> list[_Worker]:
        """The workers serving `model` that are in rotation."""
        workers = (self._workers.get(e.worker_id) for e in model.endpoints)
        return [w for w in workers if w is not None and w.out_since is None]

    def _free_endpoint(self, model: _Model, prefix_key: int = 0) -> Endpoint | None:
        """The least loaded worker in rotation with a free slot for the model, or the one the
        prefix key went to last if it has a free slot and is at most `affinity_slack` busier."""
        best, best_load, loads = None, 2.0, {}
        for worker in self._in_rotation(model):
            capacity = self._capacity(worker, model.name)
            used = worker.running[model.name]
            if used < capacity:
                loads[worker.endpoint.worker_id] = (worker.endpoint, used / capacity)
                if used / capacity < best_load:
                    best, best_load = worker.endpoint, used / capacity
        affine = loads.get(self._affinity.get((model.name, prefix_key), "")) if prefix_key else None
        if affine is not None and affine[1] <= best_load + self.affinity_slack:
            return affine[0]
        return best

    def _start(self, request: _Request, endpoint: Endpoint) -> None:
        if request.ticket.prefix_key:
            key = (request.model, request.ticket.prefix_key)
            self._affinity.pop(key, None)
            self._affinity[key] = endpoint.worker_id
            if len(self._affinity) > REMEMBERED_PREFIXES:
                self._affinity.popitem(last=False)
        request.phase, request.endpoint, request.started = Phase.RUNNING, endpoint, self._clock()
        request.start_time = time.time()
        worker = self._workers[endpoint.worker_id]
        worker.running[request.model] += 1
        request.route = (worker.running[request.model], self._capacity(worker, request.model),
                         len(self._in_rotation(self._models[request.model])))

    async def _wait(self, request: _Request, model: _Model, deadline: float | None,
                    timeout: float | None) -> Endpoint:
        t = request.ticket
        full = self.waiting >= self.max_queue or len(model.queue) >= self.max_queue_per_model
        if full and not t.redispatch:       # a request admitted once already is not new work
            self._make_room(request, model)
        request.waiting = Waiting(t.request_id, t.tenant, t.band, t.cost, request.arrival, deadline)
        request.depth_on_arrival = len(model.queue)
        request.future = asyncio.get_running_loop().create_future()
        request.reason = "NO_FREE_SLOT" if self._in_rotation(model) else "NO_WORKER_IN_ROTATION"
        model.queue.push(request.waiting)
        self._dispatch(model)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"the deadline passed after {timeout:.3f}s in the queue",
                                   reason="DEADLINE_EXCEEDED_IN_QUEUE",
                                   metadata={"model": model.name}) from None
        finally:
            if request.phase is Phase.QUEUED:
                model.queue.remove(request.waiting)

    def _make_room(self, request: _Request, model: _Model) -> None:
        """The queue is full: a newcomer of a higher band, or of a tenant with far fewer requests
        waiting, takes the place of the newest request that is worse off by that measure (it is
        refused as if it had just arrived); anyone else is refused."""
        t = request.ticket
        total = self.waiting >= self.max_queue
        victim = model.queue.displace(t.band, t.tenant)
        if victim is None:
            reason = "QUEUE_FULL" if total else "MODEL_QUEUE_FULL"
            limit = self.max_queue if total else self.max_queue_per_model
            raise ResourceExhausted(
                f"the {'' if total else model.name + ' '}queue is full ({limit} waiting); retry later",
                retry_after=self.retry_after(model.name), reason=reason,
                metadata={"model": model.name, "waiting": str(len(model.queue)), "limit": str(limit)})
        displaced = self._active[victim.request_id]
        displaced.future.set_exception(ResourceExhausted(
            "the queue is full and a request of a higher priority or a less served tenant took this "
            "one's place; retry later", retry_after=self.retry_after(model.name), reason="QUEUE_FULL_DISPLACED",
            metadata={"model": model.name}))

    def _dispatch(self, model: _Model) -> None:
        """Hands free slots of the model's workers to its waiting requests, in queue order."""
        while model.queue:
            if self._free_endpoint(model) is None:
                return
            item = model.queue.pop(self._clock())
            request = self._active[item.request_id]
            endpoint = self._free_endpoint(model, request.ticket.prefix_key)
            self._start(request, endpoint)
            request.future.set_result(endpoint)

    def _retire(self, request: _Request, outcome: str) -> None:
        """Forgets an active request, remembering how it ended; rejections are counted."""
        if request.phase is not Phase.RUNNING and outcome != "CANCELLED_IN_QUEUE":
            self.rejected[outcome] += 1
        t = request.ticket
        self._active.pop(t.request_id, None)
        self._done[t.request_id] = RequestStatus(t.request_id, Phase.DONE, request.model or t.model, t.tenant,
                                                 t.priority, 0, outcome, request.endpoint,
                                                 (request.started or self._clock()) - request.arrival,
                                                 request.start_time)
        request.phase = Phase.DONE
        while len(self._done) > REMEMBERED_DONE:
            self._done.popitem(last=False)


def _outcome(exc: BaseException) -> str:
    """The machine-readable reason a request ended before it ran."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED_IN_QUEUE"
    return getattr(exc, "reason", None) or type(exc).__name__.upper()
