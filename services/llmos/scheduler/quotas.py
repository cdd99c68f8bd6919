"""Per-tenant quotas that cannot be overshot: reserve at admission, refund at the end.

A request reserves one request and its whole possible cost (prompt + max_tokens) when it
is admitted. While it runs, its reservation counts; when it ends, the charge becomes what it
really used (its refund is immediate) and keeps counting for one window after its end, since
its tokens may have been served until then. So at any moment the charges counted cover every
token served in the last window, and a request is admitted only if the counted charges plus
its reservation stay within the limit: the tokens served in any window never pass it.

A refusal says which limit, its value and window, and when the request would fit: the
moment enough finished charges leave the window (a running request's charge leaves only
after it ends, which is not known; then the estimate is its elapsed pace).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.common.errors import ResourceExhausted
from llmos.common.keystore import Quota

WINDOW = 60.0


class ChargeLog(Protocol):
    """Where a leading scheduler writes its charges down (Unix times), so that the next leader
    counts them (`QuotaBook.restore`)."""

    def reserved(self, request_id: str, tenant: str, start: float, tokens: int) -> None: ...

    def settled(self, request_id: str, end: float, tokens: int) -> None: ...

    def released(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class KeptCharge:
    """A charge as the store keeps it: Unix times, `end` None while its request runs."""

    request_id: str
    tenant: str
    start: float
    end: float | None
    tokens: int


@dataclass
class _Charge:
    request_id: str
    start: float
    tokens: int
    end: float | None = None          # None while running


@dataclass
class _Tenant:
    quota: Quota = Quota()
    running: dict[str, _Charge] = field(default_factory=dict)
    ended: deque[_Charge] = field(default_factory=deque)       # by end time
    mean_seconds: float = 1.0                                  # of a request, for concurrency refusals


class QuotaExceeded(ResourceExhausted):
    def __init__(self, tenant: str, limit: str, value: int, retry_after: float, needed: int, counted: int) -> None:
        super().__init__(
            f"tenant {tenant!r} is over its {limit.replace('_', ' ')} quota ({value}"
            f"{'' if limit == 'max_concurrent_requests' else ' per 60s'}); retry in {retry_after:.1f}s",
            retry_after=retry_after, reason="QUOTA_EXCEEDED",
            metadata={"tenant": tenant, "limit": limit, "value": str(value),
                      "window": "" if limit == "max_concurrent_requests" else f"{WINDOW:g}s",
                      "requested": str(needed), "in_use": str(counted)})
        self.limit = limit


class QuotaBook:
    """The charges of every tenant with a quota. Not thread-safe: the scheduler's loop owns it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, log: ChargeLog | None = None) -> None:
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self.rejected: dict[tuple[str, str], int] = {}       # (tenant, limit) → refusals
        self.log = log
        # Running charges a previous leader admitted (`restore`), by request id → tenant.
        self._inherited: dict[str, str] = {}
        self._restored: set[str] = set()       # every charge `restore` read
        self._logged: set[str] = set()         # running charges written to `log`

    def _unix(self, t: float) -> float:
        return time.time() - (self._clock() - t)

    def restore(self, charges: list[KeptCharge]) -> None:
        """Counts the charges a previous leader wrote down: those that ended within the last
        window, and those still running (settled when their end is reported, `settle_inherited`,
        or given up by `forget_inherited`)."""
        now, unix_now = self._clock(), time.time()
        self._restored |= {c.request_id for c in charges}
        for kept in sorted(charges, key=lambda c: c.end or c.start):
            state = self._tenants.setdefault(kept.tenant, _Tenant())
            charge = _Charge(kept.request_id, now - (unix_now - kept.start), kept.tokens,
                             None if kept.end is None else now - (unix_now - kept.end))
            if charge.end is None:
                state.running[kept.request_id] = charge
                self._inherited[kept.request_id] = kept.tenant
            elif charge.end + WINDOW > now:
                state.ended.append(charge)

    @property
    def inherited(self) -> set[str]:
        return set(self._inherited)

    def charge_late(self, tenant: str, request_id: str, used: int) -> None:
        """A request the previous leader admitted, and died before writing its charge down,
        ended having used `used` tokens: counted from now (once)."""
        if request_id in self._restored:
            return
        self._restored.add(request_id)
        state = self._tenants.setdefault(tenant, _Tenant())
        now = self._clock()
        state.ended.append(_Charge(request_id, now, max(0, used), now))
        if self.log is not None:
            self.log.reserved(request_id, tenant, self._unix(now), max(0, used))
            self.log.settled(request_id, self._unix(now), max(0, used))

    def settle_inherited(self, request_id: str, used: int | None) -> bool:
        """A request a previous leader admitted ended; False if its charge is not known here."""
        tenant = self._inherited.pop(request_id, None)
        if tenant is None:
            return False
        self._logged.add(request_id)        # (its row is in the store)
        self.settle(tenant, request_id, used)
        return True

    def reserve(self, tenant: str, quota: Quota, request_id: str, tokens: int) -> None:
        """Reserves one request of up to `tokens` for `tenant`, or raises QuotaExceeded. A request
        the previous leader had queued, submitted again, gives its inherited charge up first."""
        previous = self._inherited.pop(request_id, None)
        if previous is not None:
            self._tenants[previous].running.pop(request_id, None)
        state = self._tenants.get(tenant)
        if state is None:
            if quota == Quota():
                return
            state = self._tenants[tenant] = _Tenant()
        state.quota = quota
        now = self._clock()
        self._expire(state, now)
        try:
            self._check(tenant, state, quota, tokens, now)
        except QuotaExceeded as exc:
            key = (tenant, exc.limit)
            self.rejected[key] = self.rejected.get(key, 0) + 1
            raise
        state.running[request_id] = _Charge(request_id, now, tokens)
        # Written down for the next leader: the charges of windowed limits (a concurrency limit
        # is counted from what runs, which the next leader learns from the workers).
        if self.log is not None and (quota.requests_per_minute or quota.tokens_per_minute):
            self._logged.add(request_id)
            self.log.reserved(request_id, tenant, self._unix(now), tokens)

    def settle(self, tenant: str, request_id: str, used: int | None) -> None:
        """The request ended having used `used` tokens (None: unknown, its reservation stands)."""
        state = self._tenants.get(tenant)
        charge = state.running.pop(request_id, None) if state else None
        if charge is None:
            return
        now = self._clock()
        charge.end = now
        if used is not None:
            charge.tokens = min(max(0, used), charge.tokens)
        state.mean_seconds = 0.8 * state.mean_seconds + 0.2 * (now - charge.start)
        state.ended.append(charge)
        if request_id in self._logged:
            self._logged.discard(request_id)
            if self.log is not None:
                self.log.settled(request_id, self._unix(now), charge.tokens)

    def release(self, tenant: str, request_id: str) -> None:
        """The request never ran (refused, timed out or cancelled in the queue): nothing is charged."""
        state = self._tenants.get(tenant)
        if state is not None and state.running.pop(request_id, None) is not None and request_id in self._logged:
            self._logged.discard(request_id)
            if self.log is not None:
                self.log.released(request_id)

    def usage(self, tenant: str) -> tuple[int, int, int]:
        """(requests in flight, requests counted in the window, tokens counted in the window)."""
        state = self._tenants.get(tenant)
        if state is None:
            return 0, 0, 0
        self._expire(state, self._clock())
        charges = [*state.running.values(), *state.ended]
        return len(state.running), len(charges), sum(c.tokens for c in charges)

    def _expire(self, state: _Tenant, now: float) -> None:
        while state.ended and state.ended[0].end + WINDOW <= now:
            state.ended.popleft()

    def _check(self, tenant: str, state: _Tenant, quota: Quota, tokens: int, now: float) -> None:
        running = list(state.running.values())
        if quota.max_concurrent and len(running) + 1 > quota.max_concurrent:
            oldest = min(c.start for c in running)
            retry = max(0.05, state.mean_seconds - (now - oldest))
            raise QuotaExceeded(tenant, "max_concurrent_requests", quota.max_concurrent, retry, 1, len(running))
        if quota.requests_per_minute:
            self._window(tenant, state, "requests_per_minute", quota.requests_per_minute, 1, now,
                         lambda c: 1)
        if quota.tokens_per_minute:
            if tokens > quota.tokens_per_minute:
                raise ResourceExhausted(
                    f"the request may cost {tokens} tokens (prompt + max_tokens), more than tenant "
                    f"{tenant!r}'s whole quota of {quota.tokens_per_minute} per 60s; lower max_tokens",
                    reason="QUOTA_EXCEEDED", metadata={
                        "tenant": tenant, "limit": "tokens_per_minute", "value": str(quota.tokens_per_minute),
                        "window": f"{WINDOW:g}s", "requested": str(tokens)})
            self._window(tenant, state, "tokens_per_minute", quota.tokens_per_minute, tokens, now,
                         lambda c: c.tokens)

    def _window(self, tenant: str, state: _Tenant, limit: str, value: int, needed: int, now: float,
                amount: Callable[[_Charge], int]) -> None:
        counted = sum(amount(c) for c in state.running.values()) + sum(amount(c) for c in state.ended)
        if counted + needed <= value:
            return
        # When enough ended charges leave the window; if the running ones alone are too many,
        # guess from the pace of this tenant's requests.
        excess = counted + needed - value
        for charge in state.ended:
            excess -= amount(charge)
            if excess <= 0:
                raise QuotaExceeded(tenant, limit, value, max(0.01, charge.end + WINDOW - now), needed, counted)
        raise QuotaExceeded(tenant, limit, value, state.mean_seconds + WINDOW, needed, counted)
