"""Worker rotation and capacity: which workers serve each model and how many slots each has.

A worker's capacity for a model is what it last reported (capped by `slots_per_worker`); its use
is the scheduler's own count of the requests it sent there and that have not finished, which is
exact. A worker leaves rotation when a stream on it fails or it has not answered a status poll for
`report_timeout` seconds, and comes back with its next good report.

Among workers with a free slot the least loaded gets a request, unless the request's prefix key (a
hash of how its input starts, from the gateway) last went to another that is at most
`affinity_slack` of its slots busier: that worker's prefix cache likely holds the prompt's start
(the earlier turns of the conversation), which it then need not compute again.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Prefix keys remembered with the worker that served them last.
REMEMBERED_PREFIXES = 8192


@dataclass(frozen=True)
class Endpoint:
    worker_id: str
    address: str


@dataclass(frozen=True)
class WorkerLoad:
    endpoint: Endpoint
    model: str
    running: int
    capacity: int
    in_rotation: bool


@dataclass
class Worker:
    endpoint: Endpoint
    capacity: dict[str, int] = field(default_factory=dict)      # model → slots, as reported
    running: Counter[str] = field(default_factory=Counter)      # model → requests sent here
    last_report: float | None = None
    out_since: float | None = None                              # out of rotation since
    listed_since: dict[str, float] = field(default_factory=dict)  # model → since the registry lists it here
    denied: dict[str, float] = field(default_factory=dict)        # model → when it said it does not hold it
    # Requests it serves that this scheduler did not send (a previous leader did), request id →
    # model, as it last reported them: their slots are in use until they end.
    inherited: dict[str, str] = field(default_factory=dict)

    def used(self, model: str) -> int:
        return self.running[model] + sum(1 for m in self.inherited.values() if m == model)


class Rotation:
    """Every worker the scheduler knows, its slots per model and its use."""

    def __init__(self, slots_per_worker: int, report_timeout: float, affinity_slack: float,
                 clock: Callable[[], float]) -> None:
        self.slots_per_worker = slots_per_worker
        self.report_timeout = report_timeout
        self.affinity_slack = affinity_slack
        self._clock = clock
        self.workers: dict[str, Worker] = {}
        self._affinity: OrderedDict[tuple[str, int], str] = OrderedDict()   # (model, prefix key) → worker id

    def capacity(self, worker: Worker, model: str) -> int:
        return min(worker.capacity.get(model, 0), self.slots_per_worker)

    def in_rotation(self, endpoints: Iterable[Endpoint]) -> list[Worker]:
        """The workers at `endpoints` that are in rotation."""
        workers = (self.workers.get(e.worker_id) for e in endpoints)
        return [w for w in workers if w is not None and w.out_since is None]

    def holds(self, worker: Worker, model: str) -> bool:
        return self.capacity(worker, model) > 0

    def held_somewhere(self, model: str, endpoints: list[Endpoint]) -> bool:
        """Whether any of the registry's `endpoints` may hold `model`: one not known yet, or
        one with slots for it (it has not said, by report or refusal, that it does not)."""
        return any((worker := self.workers.get(e.worker_id)) is None or worker.endpoint != e
                   or self.holds(worker, model) for e in endpoints)

    def free_endpoint(self, model: str, endpoints: list[Endpoint], prefix_key: int = 0) -> Endpoint | None:
        """The least loaded worker in rotation with a free slot for the model, or the one the
        prefix key went to last if it has a free slot and is at most `affinity_slack` busier."""
        best, best_load, loads = None, 2.0, {}
        for worker in self.in_rotation(endpoints):
            capacity = self.capacity(worker, model)
            used = worker.used(model)
            if used < capacity:
                loads[worker.endpoint.worker_id] = (worker.endpoint, used / capacity)
                if used / capacity < best_load:
                    best, best_load = worker.endpoint, used / capacity
        affine = loads.get(self._affinity.get((model, prefix_key), "")) if prefix_key else None
        if affine is not None and affine[1] <= best_load + self.affinity_slack:
            return affine[0]
        return best

    def take(self, endpoint: Endpoint, model: str, endpoints: list[Endpoint], prefix_key: int) -> tuple[int, int, int]:
        """A slot of `endpoint` goes to a request: (the worker's use and capacity for the model
        then, workers in rotation for it), for the route span."""
        if prefix_key:
            key = (model, prefix_key)
            self._affinity.pop(key, None)
            self._affinity[key] = endpoint.worker_id
            if len(self._affinity) > REMEMBERED_PREFIXES:
                self._affinity.popitem(last=False)
        worker = self.workers[endpoint.worker_id]
        worker.running[model] += 1
        return worker.used(model), self.capacity(worker, model), len(self.in_rotation(endpoints))

    def inherited_ended(self, request_id: str) -> str | None:
        """A request a previous leader sent ended: its slot is free now (not at the worker's next
        report). Returns its model, None if no worker reported it."""
        for worker in self.workers.values():
            model = worker.inherited.pop(request_id, None)
            if model is not None:
                return model
        return None

    def give_back(self, worker_id: str, model: str, worker_failed: bool, model_not_loaded: bool) -> None:
        """A request's slot on `worker_id` is free: the worker broke its stream (it leaves
        rotation) or said it does not hold the model (no slots for it until it reports it)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        now = self._clock()
        worker.running[model] -= 1
        if model_not_loaded:
            worker.capacity.pop(model, None)
            worker.denied[model] = now
            log.warning("worker %s does not hold %s: no requests for it go there until it reports it",
                        worker_id, model)
        if worker_failed and worker.out_since is None:
            worker.out_since = now
            log.warning("worker %s at %s out of rotation: a stream on it failed", worker_id, worker.endpoint.address)

    def listed(self, model: str, endpoints: list[Endpoint]) -> None:
        """The registry lists `model` as ready at `endpoints` (and nowhere else)."""
        now = self._clock()
        listed = {e.worker_id for e in endpoints}
        for worker in self.workers.values():
            if worker.endpoint.worker_id not in listed:
                worker.listed_since.pop(model, None)
        for e in endpoints:
            if e.worker_id not in self.workers or self.workers[e.worker_id].endpoint != e:
                previous = self.workers.get(e.worker_id)
                self.workers[e.worker_id] = Worker(e, running=previous.running if previous else Counter())
            worker = self.workers[e.worker_id]
            since = worker.listed_since.setdefault(model, now)
            # Listed since the worker's last report: slots until its next report says how many. A
            # worker that reported after that without the model does not hold it (whatever the
            # registry still says): no slots, so no request is sent there to fail.
            if (worker.last_report is None or worker.last_report < since) and worker.denied.get(model, -1.0) < since:
                worker.capacity.setdefault(model, self.slots_per_worker)

    def report(self, worker_id: str, capacity: dict[str, int], inherited: dict[str, str] | None = None) -> bool:
        """A worker's status poll answered with its slots per loaded model (and the requests it
        serves that this scheduler did not send); it is back in rotation. False for a worker
        not known."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.capacity = dict(capacity)
        if inherited is not None:
            worker.inherited = inherited
        worker.last_report = self._clock()
        for model in capacity:
            worker.denied.pop(model, None)
        if worker.out_since is not None:
            log.info("worker %s back in rotation", worker_id)
            worker.out_since = None
        return True

    def unreachable(self, worker_id: str) -> None:
        """A status poll of the worker failed: out of rotation once `report_timeout` has passed
        since its last report."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.out_since is not None:
            return
        now = self._clock()
        if worker.last_report is None or now - worker.last_report >= self.report_timeout:
            worker.out_since = now
            log.warning("worker %s at %s out of rotation: no report for %.1fs", worker_id,
                        worker.endpoint.address, self.report_timeout)

    def loads(self, placements: dict[str, list[Endpoint]]) -> list[WorkerLoad]:
        """Each (worker, model) pair that is listed or has requests running: its use and capacity."""
        pairs = {(e.worker_id, model) for model, endpoints in placements.items() for e in endpoints}
        pairs |= {(w.endpoint.worker_id, model) for w in self.workers.values() for model, n in w.running.items() if n}
        return [WorkerLoad(self.workers[wid].endpoint, model, self.workers[wid].used(model),
                           self.capacity(self.workers[wid], model), self.workers[wid].out_since is None)
                for wid, model in sorted(pairs) if wid in self.workers]
