"""The order in which waiting requests of one model go to a worker.

Three rules, applied in this order:

1. **Priority bands**: a higher band goes first. A band's standing grows with the
   wait of its oldest request (one band per `aging_seconds`), so the lowest band
   is never starved forever, while a burst of high-priority work still overtakes
   a flood of low-priority work that has waited less than that.
2. **Weighted fair queuing between tenants inside a band**, costed in tokens.
   Each tenant has a virtual time; serving a request advances its tenant's time by
   cost / weight, and the backlogged tenant with the smallest time goes next. A
   tenant that falls idle and comes back starts at the band's current virtual
   time, so it neither lost its share nor banked credit while away. The cost
   charged at dispatch is an estimate (prompt + max tokens); `charge` corrects it
   with the real count when the request ends.
3. **Earliest deadline first** among one tenant's requests, then arrival order (a request
   re-submitted after a scheduler failover arrives with the time it already waited).

Pure and synchronous: the clock is passed in.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Waiting:
    """One queued request."""

    request_id: str
    tenant: str
    band: int
    cost: float                  # estimated tokens: prompt + max new tokens
    arrival: float
    deadline: float | None = None
    seq: int = 0                 # set by the queue: arrival order
    removed: bool = field(default=False, repr=False)

    def edf_key(self) -> tuple[float, float, int]:
        # (Arrival before push order: a request re-submitted after a scheduler failover keeps
        # its place among its tenant's.)
        return (math.inf if self.deadline is None else self.deadline, self.arrival, self.seq)


class _Tenant:
    __slots__ = ("heap", "count", "vtime")

    def __init__(self) -> None:
        self.heap: list[tuple[float, float, int, Waiting]] = []
        self.count = 0
        self.vtime = 0.0

    def head(self) -> Waiting | None:
        while self.heap and self.heap[0][-1].removed:
            heapq.heappop(self.heap)
        return self.heap[0][-1] if self.heap else None


class _Band:
    __slots__ = ("tenants", "count", "vclock", "oldest")

    def __init__(self) -> None:
        self.tenants: dict[str, _Tenant] = {}
        self.count = 0
        self.vclock = 0.0
        self.oldest: list[tuple[float, int, Waiting]] = []   # arrival heap, removed entries lazily dropped

    def oldest_arrival(self) -> float:
        while self.oldest and self.oldest[0][2].removed:
            heapq.heappop(self.oldest)
        return self.oldest[0][0]

    def next_tenant(self) -> tuple[str, _Tenant]:
        return min(((name, t) for name, t in self.tenants.items() if t.count),
                   key=lambda item: (item[1].vtime, item[0]))


class FairQueue:
    def __init__(self, weight: Callable[[str], float] = lambda tenant: 1.0,
                 aging_seconds: float = 30.0) -> None:
        self._weight = weight
        self.aging_seconds = aging_seconds
        self._bands: dict[int, _Band] = {}
        self._seq = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, item: Waiting) -> None:
        item.seq = next(self._seq)
        band = self._bands.setdefault(item.band, _Band())
        tenant = band.tenants.setdefault(item.tenant, _Tenant())
        if tenant.count == 0:
            # Back from idle: start at the band's clock, with neither debt nor credit.
            tenant.vtime = max(tenant.vtime, band.vclock)
        heapq.heappush(tenant.heap, (*item.edf_key(), item))
        heapq.heappush(band.oldest, (item.arrival, item.seq, item))
        tenant.count += 1
        band.count += 1
        self._count += 1

    def remove(self, item: Waiting) -> bool:
        """Takes a request out (cancelled or expired). False if it is not waiting."""
        band = self._bands.get(item.band)
        if item.removed or band is None or item.tenant not in band.tenants:
            return False
        item.removed = True
        band.tenants[item.tenant].count -= 1
        band.count -= 1
        self._count -= 1
        return True

    def _standing(self, band: int, now: float) -> float:
        wait = now - self._bands[band].oldest_arrival()
        return band + (wait / self.aging_seconds if self.aging_seconds > 0 else 0.0)

    def _next_band(self, now: float) -> int | None:
        live = [b for b, band in self._bands.items() if band.count]
        if not live:
            return None
        return max(live, key=lambda b: (self._standing(b, now), b))

    def pop(self, now: float) -> Waiting | None:
        """The request to serve next, taken out of the queue, its estimated cost charged."""
        number = self._next_band(now)
        if number is None:
            return None
        band = self._bands[number]
        name, tenant = band.next_tenant()
        item = tenant.head()
        assert item is not None
        heapq.heappop(tenant.heap)
        self.remove(item)
        band.vclock = tenant.vtime
        tenant.vtime += item.cost / self._weight(name)
        return item

    def charge(self, tenant: str, band: int, tokens: float) -> None:
        """Adds `tokens` (negative: refunds) to what a tenant was charged in a band:
        the difference between a finished request's real and estimated cost."""
        known = self._bands.get(band)
        if known is not None and tenant in known.tenants:
            known.tenants[tenant].vtime += tokens / self._weight(tenant)

    def displace(self, band: int, tenant: str) -> Waiting | None:
        """Makes room in a full queue for a newcomer of `band` and `tenant`, if that is fair:
        takes out the newest request of a lower band (the lowest first), or else of the tenant
        with the most requests waiting in the newcomer's band, when that is at least two more
        than the newcomer's tenant has there. None: the newcomer is the one to refuse."""
        for number in sorted(b for b, known in self._bands.items() if known.count and b <= band):
            known = self._bands[number]
            name, largest = max(((n, t) for n, t in known.tenants.items() if t.count),
                                key=lambda item: (item[1].count, item[0]))
            if number == band:
                mine = known.tenants[tenant].count if tenant in known.tenants else 0
                if name == tenant or largest.count < mine + 2:
                    return None
            victim = max((w for *_, w in largest.heap if not w.removed), key=lambda w: w.seq)
            self.remove(victim)
            return victim
        return None

    def depths(self) -> Counter[tuple[int, str]]:
        """Waiting requests per (band, tenant)."""
        return Counter({(b, name): t.count for b, band in self._bands.items()
                        for name, t in band.tenants.items() if t.count})

    def order(self, now: float) -> Iterator[str]:
        """Ids of the waiting requests in the order they would be served if nothing else
        arrived (for introspection: runs on a copy, O(n log n))."""
        shadow = FairQueue(self._weight, self.aging_seconds)
        shadow._bands, shadow._count = copy.deepcopy(self._bands), self._count
        while (item := shadow.pop(now)) is not None:
            yield item.request_id
