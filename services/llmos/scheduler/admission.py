"""Admission and queueing: the scheduler's core.

A request is admitted when a worker that serves its model, and is in rotation, has a free slot
(`rotation.Rotation`). Otherwise it waits in its model's `FairQueue` (bands, tenant fairness,
deadlines, aging) until a slot frees, its deadline passes or its caller goes away. Past the queue
limits, new requests are refused at once with an estimate of when to retry. A request whose worker
failed before its first token is admitted again ahead of everything else (`Ticket.redispatch`).
How each request ended is kept in its `history.History`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.common.domain import DEFAULT_MAX_TOKENS, QueueDepth
from llmos.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    LlmosError,
    ResourceExhausted,
    Unavailable,
)
from llmos.common.keystore import Quota
from llmos.common.names import parse_model_ref

from .fairness import FairQueue, Waiting
from .history import REMEMBERED_DONE, History, Outcome, Phase, RequestStatus, refusal_reason
from .quotas import QuotaBook
from .rotation import Endpoint, Rotation, WorkerLoad

log = logging.getLogger(__name__)

# Band offset of re-dispatched requests: above every client band.
REDISPATCH_BAND = 1000


@dataclass(frozen=True)
class Resolution:
    """What a request's model name stands for now."""

    model: str                      # "name:tag" of the model that runs it (an adapter's base)
    endpoints: list[Endpoint]       # the workers where that model is ready
    alias: str = ""                 # the alias the name resolved through ("" for none)
    adapter: str = ""               # the LoRA adapter run over `model` ("" for none)
    adapter_path: str = ""          # its directory in the model store


class RegistryPort(Protocol):
    async def resolve(self, name: str, timeout: float | None, route_key: str = "") -> Resolution:
        """What `name` (a model, an adapter or an alias, picking a version by `route_key`)
        stands for; raises NotFound if it names nothing in the catalog."""

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
    conversation_id: str = ""        # picks the version of an alias that splits traffic
    client_id: str = ""              # the id its client chose ("": none), unique within its tenant
    waited: float = 0.0              # seconds it waited at a scheduler that stopped leading since

    @property
    def client_key(self) -> tuple[str, str] | None:
        """(tenant, client id) when the client chose an id: ids belong to their tenant."""
        return (self.tenant, self.client_id) if self.client_id else None

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
    alias: str = ""
    adapter: str = ""
    adapter_path: str = ""


class SchedulerEvents:
    """What the scheduler tells its telemetry; this base ignores it. `admitted` and
    `refused` run in the admitting caller's own task (its trace context is current)."""

    def admitted(self, request: Request) -> None:
        """The request got a slot (`request.endpoint`) after `request.started - request.arrival`."""

    def refused(self, request: Request, reason: str) -> None:
        """The request never ran: refused, timed out in the queue, or its caller left."""

    def finished(self, request: Request, outcome: Outcome) -> None:
        """A running request ended and its slot is free."""


@dataclass
class Request:
    """An admitted or waiting request, from its arrival to its end."""

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
class ModelQueue:
    """One model's waiting requests and where the registry last said it is ready."""

    name: str
    queue: FairQueue
    endpoints: list[Endpoint] = field(default_factory=list)
    endpoints_at: float = float("-inf")                         # when the registry said so
    mean_seconds: float = 1.0                                   # moving average of a generation


class NotLeader(Unavailable):
    """This scheduler does not lead (a standby, or one that handed its lead over): its caller
    goes to the leader (`leader`, its address, when known) and submits the request there."""

    def __init__(self, leader: str = "") -> None:
        super().__init__(f"this scheduler does not lead{'; the leader is at ' + leader if leader else ''}",
                         reason="NOT_LEADER", metadata={"leader": leader} if leader else None)


class AdmissionControl:
    """Every model's queue, the requests admitted or waiting, their tenants' quotas, and the
    workers' rotation they are admitted to.

    A scheduler that takes over the lead starts `paused`: requests queue (those re-submitted
    from the previous leader's queue keep their place, `Ticket.waited`) while it learns the slots
    in use from the workers' reports (`Rotation`'s inherited requests), and it dispatches once
    `resume`d. One that stops leading is `close`d: its waiting requests are refused with
    NOT_LEADER, for their gateways to submit them to the next leader."""

    def __init__(self, registry: RegistryPort, slots_per_worker: int = 16, max_queue: int = 64,
                 max_queue_per_model: int = 0, aging_seconds: float = 30.0, report_timeout: float = 3.0,
                 placement_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 events: SchedulerEvents | None = None, orphan_grace: float = 5.0,
                 affinity_slack: float = 0.25, tenant_max_concurrent: int = 0) -> None:
        self._registry = registry
        # The concurrency limit of a tenant whose quota sets none (0: none).
        self.tenant_max_concurrent = tenant_max_concurrent
        self.events = events or SchedulerEvents()
        self.max_queue = max_queue
        self.max_queue_per_model = max_queue_per_model or max_queue
        self.aging_seconds = aging_seconds
        self.placement_ttl = placement_ttl
        self.orphan_grace = orphan_grace
        self.rotation = Rotation(slots_per_worker, report_timeout, affinity_slack, clock)
        self.history = History()
        # What a name that is not an alias stood for: "tiny" → tiny:latest (an alias's answer may
        # change at any moment, so it is asked each time).
        self._resolved: dict[str, tuple[Resolution, float]] = {}     # and when the registry said so
        self._abandoned: OrderedDict[str, float] = OrderedDict()  # finished before they were admitted
        self._weights: dict[str, float] = {}                     # tenant → weight, as its requests say
        self._clock = clock
        self.quotas = QuotaBook(clock)
        self.paused = False
        self.closed = False
        self._charges_missing: dict[str, float] = {}    # inherited charges no worker serves, since
        self._models: dict[str, ModelQueue] = {}
        self._active: dict[str, Request] = {}
        # (tenant, client id) → the active request's own id: a client's id is an idempotency key
        # within its tenant only.
        self._clients: dict[tuple[str, str], str] = {}
        self.admitted_total = 0
        self.admitted_by_tenant: Counter[str] = Counter()

    # ---- figures -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for r in self._active.values() if r.phase is Phase.RUNNING)

    @property
    def waiting(self) -> int:
        return sum(len(m.queue) for m in self._models.values())

    @property
    def rejected(self) -> Counter[str]:
        return self.history.rejected

    @property
    def rejected_total(self) -> int:
        return self.history.rejected_total

    def queue_depths(self) -> list[QueueDepth]:
        return [QueueDepth(m.name, band if band < REDISPATCH_BAND // 2 else band - REDISPATCH_BAND, tenant, n)
                for m in self._models.values() for (band, tenant), n in sorted(m.queue.depths().items())]

    def worker_loads(self) -> list[WorkerLoad]:
        return self.rotation.loads({m.name: m.endpoints for m in self._models.values()})

    def status(self, request_id: str, tenant: str | None = None) -> RequestStatus | None:
        """Where the request is, by its own id or by the id its client chose: within `tenant`,
        or (None) within any tenant, the newest first."""
        if tenant is not None:
            own = self._clients.get((tenant, request_id))
        else:
            own = next((rid for (_, client), rid in self._clients.items() if client == request_id), None)
        if own is not None:
            return self._status(own)
        done = self.history.by_client(request_id, tenant)
        return done if done is not None else self._status(request_id)

    def _status(self, request_id: str) -> RequestStatus | None:
        request = self._active.get(request_id)
        if request is None:
            return self.history.get(request_id)
        t = request.ticket
        position, queued = 0, request.started - request.arrival
        if request.phase is Phase.QUEUED:
            queued = self._clock() - request.arrival
            if request.waiting is not None:
                model = self._models[request.model]
                position = next(i for i, rid in enumerate(model.queue.order(self._clock()), 1) if rid == request_id)
        return RequestStatus(request_id, request.phase, request.model or t.model, t.tenant, t.priority, position,
                             request.reason if request.phase is Phase.QUEUED else "", request.endpoint, queued,
                             request.start_time, t.client_id)

    def retry_after(self, model: str) -> float:
        """An honest guess of when a request sent now would get a slot: the queue ahead of
        it, served at the measured pace of the model's workers."""
        known = self._models.get(model)
        if known is None:
            return 1.0
        capacity = sum(self.rotation.capacity(w, model) for w in self.rotation.in_rotation(known.endpoints))
        return max(0.1, known.mean_seconds * (len(known.queue) + 1) / max(1, capacity))

    # ---- requests --------------------------------------------------------------------------

    async def admit(self, ticket: Ticket, timeout: float | None = None) -> Admission:
        """Admits a generation, waiting at most `timeout` seconds (the caller's deadline)."""
        now = self._clock()
        arrival = now - max(0.0, ticket.waited)
        deadline = None if timeout is None else now + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - self._clock())

        if self.closed:
            raise NotLeader()
        client = ticket.client_key
        if ticket.request_id in self._active or client in self._clients:
            shown = ticket.client_id or ticket.request_id
            raise AlreadyExists(f"request {shown!r} is already queued or running",
                                reason="DUPLICATE_REQUEST_ID", metadata={"request_id": shown})
        parse_model_ref(ticket.model)
        if not 0 < ticket.weight <= 1000:
            raise ValueError(f"tenant weight must be more than 0 and at most 1000, got {ticket.weight}")
        request = self._active[ticket.request_id] = Request(ticket, "", arrival)
        if client is not None:
            self._clients[client] = ticket.request_id
        self.history.forget(ticket.request_id)
        try:
            self._weights[ticket.tenant] = ticket.weight
            quota = ticket.quota
            if not quota.max_concurrent and self.tenant_max_concurrent:
                quota = dataclasses.replace(quota, max_concurrent=self.tenant_max_concurrent)
            self.quotas.reserve(ticket.tenant, quota, ticket.request_id, ticket.cost)
            cached = self._cached(ticket.model) if ticket.keep_alive is None else None
            if cached is not None:
                resolution, endpoints = self._resolved[ticket.model][0], cached.endpoints
            else:
                try:
                    resolution = await self._registry.resolve(ticket.model, remaining(), ticket.conversation_id)
                except LlmosError as exc:
                    # The registry restarting: the model's last known placements serve meanwhile.
                    stale = self._stale(ticket.model) if exc.reason == "REGISTRY_UNREACHABLE" else None
                    if stale is None:
                        raise
                    resolution = stale
                endpoints = resolution.endpoints or self._reported(resolution.model)
                if not resolution.alias:     # names of the catalog's entries: as many as it holds
                    self._resolved[ticket.model] = resolution, self._clock()
            resolved = request.model = resolution.model
            loaded = False
            if not self.rotation.held_somewhere(resolved, endpoints) or ticket.keep_alive is not None:
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
            if self.closed:      # it stopped leading while the registry answered
                raise NotLeader()
            given_up = self._abandoned.pop(ticket.request_id, None)
            if request.abandoned or (given_up is not None and self._clock() - given_up < 30.0):
                raise Cancelled("the caller went away before the request was admitted",
                                reason="CANCELLED_IN_QUEUE")
            endpoint = self.rotation.free_endpoint(model.name, model.endpoints, ticket.prefix_key) \
                if not model.queue and not self.paused else None
            if endpoint is None:
                endpoint = await self._wait(request, model, deadline, remaining())
            else:
                self._start(request, endpoint)
        except BaseException as exc:
            if request.phase is Phase.RUNNING:       # a slot was handed over as the caller left
                self.finish(ticket.request_id, outcome=Outcome.CANCELLED)
            else:
                self.quotas.release(ticket.tenant, ticket.request_id)
                self._retire(request, refusal_reason(exc))
                self.events.refused(request, refusal_reason(exc))
            raise
        self.admitted_total += 1
        self.admitted_by_tenant[ticket.tenant] += 1
        self.events.admitted(request)
        return Admission(ticket.request_id, request.model, endpoint, request.started - arrival, resolution.alias,
                         resolution.adapter, resolution.adapter_path)

    def finish(self, request_id: str, tokens: int | None = None, *, outcome: Outcome,
               worker_failed: bool = False, model_not_loaded: bool = False, tenant: str = "") -> bool:
        """Releases a running generation's slot. `tokens`: what it really cost (prompt +
        generated), to correct its tenant's charge; `worker_failed`: its worker broke the
        stream, so it leaves rotation; `model_not_loaded`: its worker does not hold the model,
        so it gets no more of its requests until it reports holding it; `tenant`: its tenant, for
        a request the previous leader admitted whose charge it had not written down yet.
        Idempotent."""
        request = self._active.get(request_id)
        if request is None and self._inherited_ended(request_id, tokens, tenant):
            return True
        if request is None or request.phase is Phase.QUEUED:
            # The caller gave up before it heard of its admission: whatever is granted later
            # is given back at once.
            self._abandon(request_id, request)
            return False
        if request.phase is not Phase.RUNNING:
            return False
        now = self._clock()
        model = self._models[request.model]
        self.rotation.give_back(request.endpoint.worker_id, request.model, worker_failed, model_not_loaded)
        if tokens is not None:
            model.queue.charge(request.ticket.tenant, request.ticket.band, tokens - request.ticket.cost)
        self.quotas.settle(request.ticket.tenant, request_id, tokens)
        if not worker_failed:
            model.mean_seconds = 0.9 * model.mean_seconds + 0.1 * (now - request.started)
        self._retire(request, outcome.value)
        self.events.finished(request, outcome)
        self._dispatch(model)
        return True

    def _inherited_ended(self, request_id: str, tokens: int | None, tenant: str) -> bool:
        """A request the previous leader admitted ended: its slot and its charge come back (a
        charge it died before writing down is counted now, from what the request used)."""
        model = self.rotation.inherited_ended(request_id)
        settled = self.quotas.settle_inherited(request_id, tokens)
        if not settled and model is not None and tenant and tokens is not None:
            self.quotas.charge_late(tenant, request_id, tokens)
        if model is not None and model in self._models:
            self._dispatch(self._models[model])
        return model is not None or settled

    # ---- leadership ------------------------------------------------------------------------

    def resume(self) -> None:
        """Starts dispatching (a new leader, once it knows the slots in use)."""
        self.paused = False
        for model in list(self._models.values()):
            self._dispatch(model)

    def close(self, leader: str = "") -> None:
        """Stops leading: every waiting request is refused with NOT_LEADER (its gateway submits
        it to `leader`), and so is every new one. Running requests go on; their ends are the
        next leader's to hear."""
        self.closed = True
        for request in list(self._active.values()):
            if request.phase is Phase.QUEUED and request.future is not None and not request.future.done():
                request.future.set_exception(NotLeader(leader))

    def forget_inherited_charges(self) -> None:
        """Inherited running charges whose request no worker has reported for `orphan_grace`
        seconds (its gateway died with the previous leader) end at their reservation."""
        now = self._clock()
        served = {rid for w in self.rotation.workers.values() for rid in w.inherited}
        for request_id in self.quotas.inherited - served:
            since = self._charges_missing.setdefault(request_id, now)
            if now - since >= self.orphan_grace:
                self._charges_missing.pop(request_id)
                self.quotas.settle_inherited(request_id, None)
        for request_id in set(self._charges_missing) & served:
            del self._charges_missing[request_id]

    def _abandon(self, request_id: str, request: Request | None) -> None:
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
        """Where the registry says `model` is ready now (a registry just started knows no worker
        yet, until they register again: while it lists none, the workers' own reports say)."""
        endpoints = endpoints or self._reported(model)
        known = self._model(model)
        known.endpoints, known.endpoints_at = list(endpoints), self._clock()
        self.rotation.listed(model, endpoints)
        if dispatch:
            self._dispatch(known)

    def report(self, worker_id: str, capacity: dict[str, int], serving: set[str] | None = None,
               by_model: dict[str, list[str]] | None = None) -> None:
        """A worker's status poll answered: its slots per loaded model and the requests it serves
        (`by_model`: each model's). A request running there that the worker has not known for
        `orphan_grace` seconds (its gateway died before it could say the request ended) gets its
        slot back; one this scheduler never admitted (the previous leader did) holds a slot."""
        if worker_id not in self.rotation.workers:
            return
        if serving is not None:
            self._reconcile(worker_id, serving)
        inherited = None
        if by_model is not None:
            inherited = {rid: model for model, ids in by_model.items() for rid in ids
                         if rid not in self._active and self.history.get(rid) is None}
        self.rotation.report(worker_id, capacity, inherited)
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
            self.finish(request_id, outcome=Outcome.ORPHANED)

    def unreachable(self, worker_id: str) -> None:
        """A status poll of the worker failed."""
        self.rotation.unreachable(worker_id)

    def workers(self) -> list[Endpoint]:
        return [w.endpoint for w in self.rotation.workers.values()]

    def starved_models(self) -> list[str]:
        """Models with waiting requests and no worker in rotation that holds them (by its own
        report): their placements need a fresh look, and a load if there are none."""
        return [m.name for m in self._models.values()
                if m.queue and not any(self.rotation.holds(w, m.name) for w in self.rotation.in_rotation(m.endpoints))]

    # ---- inside ----------------------------------------------------------------------------

    def _cached(self, name: str) -> ModelQueue | None:
        """The model `name` resolves to, when the registry was asked about it in the last
        `placement_ttl` seconds and it had a worker then."""
        known, at = self._resolved.get(name, (None, float("-inf")))
        if known is None or self._clock() - at > self.placement_ttl:       # what the name is may change
            return None
        model = self._models.get(known.model)       # its endpoints are as new as the resolution, or newer
        return model if model is not None and model.endpoints else None

    def _reported(self, model: str) -> list[Endpoint]:
        """The workers in rotation whose last report says they hold `model`."""
        return [w.endpoint for w in self.rotation.workers.values()
                if w.out_since is None and w.last_report is not None and self.rotation.holds(w, model)]

    def _stale(self, name: str) -> Resolution | None:
        """What `name` last resolved to (or, never asked here, the model of that name and tag, as
        a new leader's first look at the placements found it), with the workers it is ready on
        now, if any."""
        known = self._resolved.get(name, (None, 0.0))[0] or Resolution(str(parse_model_ref(name)), [])
        model = self._models.get(known.model)
        if model is None or not model.endpoints:
            return None
        return dataclasses.replace(known, endpoints=list(model.endpoints))

    def _model(self, name: str) -> ModelQueue:
        model = self._models.get(name)
        if model is None:
            queue = FairQueue(lambda tenant: self._weights.get(tenant, 1.0), self.aging_seconds)
            model = self._models[name] = ModelQueue(name, queue)
        return model

    def _start(self, request: Request, endpoint: Endpoint) -> None:
        request.phase, request.endpoint, request.started = Phase.RUNNING, endpoint, self._clock()
        request.start_time = time.time()
        model = self._models[request.model]
        request.route = self.rotation.take(endpoint, request.model, model.endpoints, request.ticket.prefix_key)

    async def _wait(self, request: Request, model: ModelQueue, deadline: float | None,
                    timeout: float | None) -> Endpoint:
        t = request.ticket
        full = self.waiting >= self.max_queue or len(model.queue) >= self.max_queue_per_model
        if full and not t.redispatch:       # a request admitted once already is not new work
            self._make_room(request, model)
        request.waiting = Waiting(t.request_id, t.tenant, t.band, t.cost, request.arrival, deadline)
        request.depth_on_arrival = len(model.queue)
        request.future = asyncio.get_running_loop().create_future()
        request.reason = "NO_FREE_SLOT" if self.rotation.in_rotation(model.endpoints) else "NO_WORKER_IN_ROTATION"
        model.queue.push(request.waiting)
        self._dispatch(model)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except asyncio.CancelledError:
            if request.abandoned and request.future.cancelled():      # its caller finished it first
                raise Cancelled("the caller went away while the request waited",
                                reason="CANCELLED_IN_QUEUE") from None
            raise
        except TimeoutError:
            raise DeadlineExceeded(f"the deadline passed after {timeout:.3f}s in the queue",
                                   reason="DEADLINE_EXCEEDED_IN_QUEUE",
                                   metadata={"model": model.name}) from None
        finally:
            if request.phase is Phase.QUEUED:
                model.queue.remove(request.waiting)

    def _make_room(self, request: Request, model: ModelQueue) -> None:
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

    def _dispatch(self, model: ModelQueue) -> None:
        """Hands free slots of the model's workers to its waiting requests, in queue order."""
        while model.queue and not self.paused:
            if self.rotation.free_endpoint(model.name, model.endpoints) is None:
                return
            item = model.queue.pop(self._clock())
            request = self._active[item.request_id]
            endpoint = self.rotation.free_endpoint(model.name, model.endpoints, request.ticket.prefix_key)
            self._start(request, endpoint)
            request.future.set_result(endpoint)

    def _retire(self, request: Request, reason: str) -> None:
        """Forgets an active request, keeping how it ended in the history."""
        t = request.ticket
        self._active.pop(t.request_id, None)
        if t.client_key is not None and self._clients.get(t.client_key) == t.request_id:
            del self._clients[t.client_key]
        self.history.record(RequestStatus(t.request_id, Phase.DONE, request.model or t.model, t.tenant, t.priority,
                                          0, reason, request.endpoint,
                                          (request.started or self._clock()) - request.arrival, request.start_time,
                                          t.client_id),
                            ran=request.phase is Phase.RUNNING)
        request.phase = Phase.DONE
