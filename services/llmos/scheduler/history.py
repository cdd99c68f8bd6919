"""Request history: how requests are (phase), how those that are done ended (outcome), and the
last `REMEMBERED_DONE` of them, for GetRequestStatus and the rejection counts of GetSchedulerStats."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass

from .rotation import Endpoint

# Finished requests remembered for GetRequestStatus.
REMEMBERED_DONE = 10_000


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Outcome(enum.Enum):
    """How a request that ran ended: the `outcome` label of `llmos_scheduler_finished` and a done
    request's `reason` (the servicer maps FinishGeneration's fields to it). A request that never
    ran ends with the reason of the error that refused it (`QUEUE_FULL`,
    `DEADLINE_EXCEEDED_IN_QUEUE`, ...) or `CANCELLED_IN_QUEUE` (`refusal_reason`)."""

    STOP = "STOP"                      # the model ended it, or a stop sequence or a grammar did
    LENGTH = "LENGTH"                  # it reached max_tokens or the context
    CANCELLED = "CANCELLED"            # its caller went away or its deadline passed
    FAILED = "FAILED"                  # it ended with an error on its worker
    WORKER_FAILED = "WORKER_FAILED"    # its worker broke the stream (the worker leaves rotation)
    ORPHANED = "ORPHANED"              # its gateway went away without saying it ended

# A request whose caller went away while it waited: counted apart from refusals.
CANCELLED_IN_QUEUE = "CANCELLED_IN_QUEUE"


def refusal_reason(exc: BaseException) -> str:
    """The machine-readable reason a request ended before it ran."""
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED_IN_QUEUE
    return getattr(exc, "reason", None) or type(exc).__name__.upper()


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
    client_id: str = ""              # the id its client chose, if it did


class History:
    """Done requests, newest last, and how many never ran, by reason."""

    def __init__(self, remembered: int = REMEMBERED_DONE) -> None:
        self._remembered = remembered
        self._done: OrderedDict[str, RequestStatus] = OrderedDict()
        # (tenant, client id) → the newest done request's own id.
        self._clients: dict[tuple[str, str], str] = {}
        self.rejected: Counter[str] = Counter()

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def get(self, request_id: str) -> RequestStatus | None:
        return self._done.get(request_id)

    def by_client(self, client_id: str, tenant: str | None) -> RequestStatus | None:
        """The newest done request of `tenant` (None: of any tenant) whose client chose `client_id`."""
        if tenant is not None:
            own = self._clients.get((tenant, client_id))
            return None if own is None else self._done.get(own)
        return next((s for s in reversed(self._done.values()) if s.client_id == client_id), None)

    def forget(self, request_id: str) -> None:
        """A request of this id arrives again."""
        self._drop(self._done.pop(request_id, None))

    def _drop(self, status: RequestStatus | None) -> None:
        if status is not None and status.client_id:
            key = (status.tenant, status.client_id)
            if self._clients.get(key) == status.request_id:
                del self._clients[key]

    def record(self, status: RequestStatus, ran: bool) -> None:
        """A request is done; one that never ran (but for its caller leaving) is a rejection."""
        if not ran and status.reason != CANCELLED_IN_QUEUE:
            self.rejected[status.reason] += 1
        self._done[status.request_id] = status
        if status.client_id:
            self._clients[(status.tenant, status.client_id)] = status.request_id
        while len(self._done) > self._remembered:
            self._drop(self._done.popitem(last=False)[1])
