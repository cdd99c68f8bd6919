"""Authentication and authorization of every call a service receives.

`AuthInterceptor` looks up the method in `authz.TABLE` (default deny), identifies the caller
(its certificate's SPIFFE id and/or its `authorization: Bearer <key>`), refuses what the rule
does not allow, and leaves the caller's `Principal` in a context variable for the servicer
(the gateway reads the tenant from it). Keys are checked against the shared `KeyStore`; a
key's record is re-read at least every `refresh_seconds`, so a revocation reaches every
process within that time. Every decision on an admin method is an audit log line.

Servers look keys up off their event loop (`Guard.check_async`): on a thread of their own, one
lookup at a time per key, waited for at most `LOOKUP_SECONDS`. A store that does not answer then
(stalled, half-open) costs a call that long at most and never holds the loop: a key seen lately
keeps working (for `STALE_SECONDS`), one that was not is UNAVAILABLE (STORE_UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from . import authz
from .errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from .keystore import DEFAULT_TENANT, ApiKey, KeyStore, Role, Tenant, parse_key, secret_matches
from .status import rewrap
from .tls import peer_identity

audit = logging.getLogger("llmos.audit")

MAX_CACHED_KEYS = 10_000
# The longest a server waits for the key store to answer one lookup, seconds.
LOOKUP_SECONDS = 1.0
# Threads looking keys up (each held as long as its lookup: a stalled store holds them all).
LOOKUP_THREADS = 4
# How long a key seen lately keeps working while the key store cannot be reached, seconds.
STALE_SECONDS = 300.0
# Failed authentications one key id, or one source address, may have in a window. Past them, calls
# with that key id are refused (RESOURCE_EXHAUSTED, AUTH_RATE_LIMITED, with the delay) until its
# oldest failure leaves the window; calls from that address are refused the same way unless their
# key is one seen valid lately (other clients behind the same address keep working), so a flood of
# made-up keys costs no key lookup.
MAX_AUTH_FAILURES = 50
AUTH_FAILURE_WINDOW = 10.0


class FailureLimiter:
    """Counts failed authentications per source address and per key id, in a sliding window."""

    def __init__(self, limit: int = MAX_AUTH_FAILURES, window: float = AUTH_FAILURE_WINDOW,
                 clock: Callable[[], float] = time.monotonic, tracked: int = 10_000) -> None:
        self.limit, self.window, self._clock, self._tracked = limit, window, clock, tracked
        self._failures: dict[str, collections.deque[float]] = {}

    def check(self, subject: str) -> None:
        """Raises ResourceExhausted when `subject` has failed `limit` times in the window."""
        if not subject or subject not in self._failures:
            return
        now, times = self._clock(), self._failures[subject]
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            raise ResourceExhausted(
                f"too many failed authentications; retry in {times[0] + self.window - now:.1f}s",
                retry_after=max(0.1, times[0] + self.window - now), reason="AUTH_RATE_LIMITED")

    def failed(self, *subjects: str) -> None:
        now = self._clock()
        if len(self._failures) >= self._tracked:
            self._failures.clear()
        for subject in subjects:
            if subject:
                self._failures.setdefault(subject, collections.deque(maxlen=self.limit)).append(now)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a service (by certificate), a key's holder, or, with security off, anyone."""

    service: str = ""                 # the caller's service name when it called as a service
    instance: str = ""                # its instance (a worker's id)
    key_id: str = ""
    role: Role | None = None
    tenant: Tenant = Tenant(DEFAULT_TENANT)

    def describe(self) -> str:
        if self.key_id:
            return f"key {self.key_id} ({self.role.value}, tenant {self.tenant.name})"
        return f"service {self.service}/{self.instance}" if self.service else "anonymous"


ANONYMOUS = Principal()
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("llmos_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being handled."""
    return _current.get()


def require_worker(worker_id: str) -> None:
    """A worker's certificate may act for that worker only (register as it, hold its leases)."""
    caller = _current.get()
    if caller.service == "worker" and caller.instance != worker_id:
        raise PermissionDenied(f"worker {caller.instance!r} may act only as itself, not as {worker_id[:64]!r}",
                               reason="WORKER_IDENTITY_MISMATCH", metadata={"worker_id": worker_id[:64]})


class Authenticator:
    """Checks `Bearer` keys against the key store, keeping each record at most `refresh_seconds`."""

    def __init__(self, store: KeyStore | None, refresh_seconds: float = 2.0,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._refresh = refresh_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, tuple[ApiKey, str, Tenant] | None]] = {}
        self._lookups: dict[str, Future] = {}
        self._threads: ThreadPoolExecutor | None = None

    def authenticate(self, authorization: str | None) -> Principal:
        """The key's principal; raises Unauthenticated (API_KEY_MISSING / API_KEY_INVALID).
        Looks the key up on this thread (tools and tests; servers use `authenticate_async`)."""
        key_id, secret = self._parse(authorization)
        return self._principal(key_id, secret, self._record(key_id) if key_id else None)

    async def authenticate_async(self, authorization: str | None) -> Principal:
        """`authenticate`, the key looked up off the event loop (see the module's doc)."""
        key_id, secret = self._parse(authorization)
        return self._principal(key_id, secret, await self._record_async(key_id) if key_id else None)

    @staticmethod
    def _parse(authorization: str | None) -> tuple[str, str]:
        if not authorization:
            raise Unauthenticated("this method needs an API key: send 'authorization: Bearer <key>'",
                                  reason="API_KEY_MISSING")
        return _bearer_key(authorization) or ("", "")

    def _principal(self, key_id: str, secret: str, record: tuple[ApiKey, str, Tenant] | None) -> Principal:
        if not key_id:
            return self._refuse("malformed", "")
        if record is None:
            return self._refuse("unknown", key_id)
        key, stored_hash, tenant = record
        if not secret_matches(secret, stored_hash):
            return self._refuse("wrong secret", key_id)
        why = key.why_unusable(self._clock())
        if why:
            return self._refuse(why, key_id)
        return Principal(key_id=key_id, role=key.role, tenant=tenant)

    def known_valid(self, key_id: str) -> bool:
        """Whether `key_id` is a key this process found in the store lately (no lookup)."""
        cached = self._cache.get(key_id)
        return cached is not None and cached[1] is not None and self._monotonic() - cached[0] < STALE_SECONDS

    async def _record_async(self, key_id: str) -> tuple[ApiKey, str, Tenant] | None:
        now = self._monotonic()
        cached = self._cache.get(key_id)
        if (cached is not None and now - cached[0] < self._refresh) or self._store is None:
            return cached[1] if cached is not None else None
        lookup = self._lookups.get(key_id)
        if lookup is None or lookup.done():
            if self._threads is None:
                self._threads = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="llmos-key-lookup")
            lookup = self._lookups[key_id] = self._threads.submit(self._lookup, key_id, now)
            lookup.add_done_callback(lambda done, k=key_id: self._lookups.pop(k, None) if self._lookups.get(k)
                                     is done else None)
        waited = asyncio.wrap_future(lookup)
        waited.add_done_callback(_retrieved)     # (its error, if nobody waits for it any more)
        try:
            return await asyncio.wait_for(asyncio.shield(waited), LOOKUP_SECONDS)
        except (Unavailable, TimeoutError) as exc:
            # The store is down or does not answer: a key seen lately still works (nobody can
            # revoke it meanwhile either), for at most STALE_SECONDS; an unknown one cannot be checked.
            if cached is not None and now - cached[0] < STALE_SECONDS:
                return cached[1]
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"the key store did not answer within {LOOKUP_SECONDS:g} s",
                              reason="STORE_UNAVAILABLE") from None

    def _lookup(self, key_id: str, now: float) -> tuple[ApiKey, str, Tenant] | None:
        record = self._store.lookup(key_id)
        if record is not None:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record

    def _record(self, key_id: str) -> tuple[ApiKey, str, Tenant] | None:
        now = self._monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._refresh:
            return cached[1]
        try:
            record = self._store.lookup(key_id) if self._store is not None else None
        except Unavailable:
            # The store is down: a key seen lately still works (nobody can revoke it meanwhile
            # either), for at most STALE_SECONDS; an unknown one cannot be checked.
            if cached is not None and now - cached[0] < STALE_SECONDS:
                return cached[1]
            raise
        if record is not None:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record

    def _refuse(self, why: str, key_id: str) -> Principal:
        audit.info("audit: authentication refused: key %s %s", key_id or "-", why)
        raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _source(peer: str | None) -> str:
    """The address of a gRPC peer ("ipv4:127.0.0.1:5555" → "ipv4:127.0.0.1"), without its port."""
    if not peer:
        return ""
    kind, _, rest = peer.partition(":")
    return f"{kind}:{rest.rsplit(':', 1)[0]}" if kind in ("ipv4", "ipv6") else peer


def _bearer_key(authorization: str | None) -> tuple[str, str] | None:
    """(key id, secret) of an `authorization: Bearer <key>` value, None when it holds no key."""
    scheme, _, token = (authorization or "").partition(" ")
    return parse_key(token.strip()) if scheme.lower() == "bearer" else None


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


class Guard:
    """Decides one call: who the caller is, and whether the method's rule lets them in."""

    def __init__(self, authenticator: Authenticator, table: dict[str, authz.Rule] | None = None,
                 enforce: bool = True) -> None:
        self.authenticator = authenticator
        self.table = authz.TABLE if table is None else table
        self.enforce = enforce
        self.failures = FailureLimiter()

    def check(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        decided = self._without_key(method, context)
        return decided if isinstance(decided, Principal) else self._by_key(method, *decided)

    async def check_async(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        """`check`, with the key looked up off the event loop."""
        decided = self._without_key(method, context)
        return decided if isinstance(decided, Principal) else await self._by_key_async(method, *decided)

    def _without_key(self, method: str, context: grpc.aio.ServicerContext
                     ) -> Principal | tuple[authz.Rule, str | None, str]:
        """The caller when its certificate decides; else what deciding by its key needs."""
        peer = peer_identity(context)
        if not self.enforce:
            return Principal(*peer) if peer else ANONYMOUS
        rule = self.table.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} has no authorization rule: refused",
                                   reason="METHOD_NOT_ALLOWED", metadata={"method": method})
        if peer is not None and peer[0] in rule.services:
            return Principal(*peer)
        if rule.role is None:
            raise PermissionDenied(f"{method} is internal to llmos ({rule.describe()})",
                                   reason="CALLER_NOT_ALLOWED", metadata={"method": method})
        authorization = _metadata(context, "authorization")
        if authorization is None and peer is not None and peer[0] != authz.CLI:
            raise PermissionDenied(f"service {peer[0]} may not call {method} ({rule.describe()})",
                                   reason="CALLER_NOT_ALLOWED", metadata={"method": method})
        return rule, authorization, _source(context.peer())

    def check_key(self, route: str, authorization: str | None, source: str = "") -> Principal:
        """Decides an HTTP call ("POST /v1/chat/completions"), which can bring a key only, by
        `authz.HTTP_TABLE`."""
        rule = self._http_rule(route)
        return ANONYMOUS if rule is None else self._by_key(route, rule, authorization, source)

    async def check_key_async(self, route: str, authorization: str | None, source: str = "") -> Principal:
        """`check_key`, with the key looked up off the event loop."""
        rule = self._http_rule(route)
        return ANONYMOUS if rule is None else await self._by_key_async(route, rule, authorization, source)

    def _http_rule(self, route: str) -> authz.Rule | None:
        """The route's rule (None: security is off); a route without one is refused."""
        if not self.enforce:
            return None
        rule = authz.HTTP_TABLE.get(route)
        if rule is None or rule.role is None:
            raise PermissionDenied(f"{route} has no authorization rule: refused",
                                   reason="METHOD_NOT_ALLOWED", metadata={"method": route})
        return rule

    def _by_key(self, method: str, rule: authz.Rule, authorization: str | None, source: str = "") -> Principal:
        key_subject = self._attempt(authorization, source)
        try:
            principal = self.authenticator.authenticate(authorization)
        except Unauthenticated as exc:
            self._refused(method, rule, exc, source, key_subject)
            raise
        return self._allowed(method, rule, principal)

    async def _by_key_async(self, method: str, rule: authz.Rule, authorization: str | None,
                            source: str = "") -> Principal:
        key_subject = self._attempt(authorization, source)
        try:
            principal = await self.authenticator.authenticate_async(authorization)
        except Unauthenticated as exc:
            self._refused(method, rule, exc, source, key_subject)
            raise
        return self._allowed(method, rule, principal)

    def _attempt(self, authorization: str | None, source: str) -> str:
        """Refuses a key id, or an address, past its failures; returns the key's subject."""
        parsed = _bearer_key(authorization)
        key_id = parsed[0] if parsed else ""
        key_subject = f"key:{key_id}" if key_id else ""
        self.failures.check(key_subject)
        if not self.authenticator.known_valid(key_id):
            self.failures.check(source)
        return key_subject

    def _refused(self, method: str, rule: authz.Rule, exc: Unauthenticated, source: str, key_subject: str) -> None:
        if exc.reason != "API_KEY_MISSING":
            self.failures.failed(source, key_subject)
        if rule.role is Role.ADMIN:
            audit.info("audit: %s refused (%s)", method, exc.reason)

    def _allowed(self, method: str, rule: authz.Rule, principal: Principal) -> Principal:
        if rule.role is Role.ADMIN and principal.role is not Role.ADMIN:
            audit.info("audit: %s refused for %s: admin role required", method, principal.describe())
            raise PermissionDenied(f"{method} needs an admin key", reason="ROLE_REQUIRED",
                                   metadata={"method": method, "role": Role.ADMIN.value})
        return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses what the table does not allow before the handler runs; the handler then finds
    its caller in `current_principal()`. Refusals are typed errors, made statuses by the
    `ErrorInterceptor` that runs before this one."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or authz.is_open(method):
            return handler
        guard = self._guard
        admin = guard.table.get(method, authz.Rule()).role is Role.ADMIN

        def answered(behavior: Any, one_request: bool) -> Any:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _current.set(await guard.check_async(method, context))
                if not admin:
                    return await behavior(request, context)
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    _audit(method, exc)
                    raise
                _audit(method, None)
                return response
            return call

        def streamed(behavior: Any, one_request: bool) -> Any:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _current.set(await guard.check_async(method, context))
                if admin:
                    _audit(method, None, "started")
                async for item in behavior(request, context):
                    yield item
            return call

        # Every kind, those that stream their requests too (none of llmos's own yet): a handler
        # passed on unchecked would let any caller in.
        return rewrap(handler, answered, streamed)


def _audit(method: str, exc: BaseException | None, outcome: str = "") -> None:
    principal = current_principal()
    if not outcome:
        outcome = "ok" if exc is None else getattr(exc, "reason", None) or type(exc).__name__
    audit.info("audit: %s by %s: %s", method, principal.describe(), outcome)
