"""Tenants and API keys, in the store shared by every process of the suite.

A key is printed once as `llmos-<key id>-<secret>`. Only the key id (for lookup) and a
SHA-256 hash of the secret are stored: the secret is 256 random bits, so a fast hash is
enough (nothing to brute-force), and it is compared in constant time. A key belongs to one
tenant and has a role; it may expire, be revoked, or be rotated (a new key of the same
tenant, role and label; the old one keeps working for a grace period).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from .store import Store, api_keys, tenants

KEY_PREFIX = "llmos-"
KEY_ID_LENGTH = 16          # hex characters
SECRET_BYTES = 32
MAX_KEY_LENGTH = 128
_KEY = re.compile(r"^llmos-([0-9a-f]{16})-([A-Za-z0-9_-]{43})$")
TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_LABEL = 128
MAX_QUOTA = 10**9
MAX_WEIGHT = 1000.0
MAX_SECONDS = 10 * 365 * 86400.0
DEFAULT_TENANT = "default"


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits; 0 means no limit."""

    max_concurrent: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    priority_ceiling: int = 10
    quota: Quota = Quota()
    create_time: float = 0.0


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    role: Role
    label: str = ""
    create_time: float = 0.0
    expire_time: float | None = None
    revoke_time: float | None = None

    def why_unusable(self, now: float) -> str:
        """Why the key may not be used at `now` ("revoked", "expired"); "" when it may."""
        if self.revoke_time is not None and self.revoke_time <= now:
            return "revoked"
        if self.expire_time is not None and self.expire_time <= now:
            return "expired"
        return ""


def parse_key(text: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _KEY.fullmatch(text) if len(text) <= MAX_KEY_LENGTH else None
    return (match.group(1), match.group(2)) if match else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def check_tenant(tenant: Tenant) -> None:
    """Range-checks every field of a tenant before it is stored."""
    problems = []
    if not TENANT_NAME.fullmatch(tenant.name):
        problems.append(("name", "must be 1-63 characters: lowercase letters, digits and '-', starting with a letter"))
    if not 0 < tenant.weight <= MAX_WEIGHT:
        problems.append(("weight", f"must be more than 0 and at most {MAX_WEIGHT:g}"))
    if not -10 <= tenant.priority_ceiling <= 10:
        problems.append(("priority_ceiling", "must be between -10 and 10"))
    for f in dataclasses.fields(Quota):
        value = getattr(tenant.quota, f.name)
        if not 0 <= value <= MAX_QUOTA:
            problems.append((f"quota.{f.name}", f"must be between 0 (no limit) and {MAX_QUOTA}"))
    if problems:
        raise InvalidArgument("; ".join(f"{f}: {d}" for f, d in problems), reason="INVALID_FIELD",
                              violations=[FieldViolation(f, d) for f, d in problems],
                              metadata={"field": problems[0][0]})


def check_label(label: str) -> None:
    if len(label) > MAX_LABEL or not label.isprintable():
        raise InvalidArgument.field("label", f"must be at most {MAX_LABEL} printable characters")


class KeyStore:
    """Tenants and keys in the store's `tenants` and `api_keys` tables; every write is one
    transaction."""

    def __init__(self, store: Store, clock=time.time) -> None:
        self.store = store
        self._clock = clock

    def close(self) -> None:
        self.store.close()

    # ---- tenants ----------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant) -> Tenant:
        check_tenant(tenant)
        tenant = dataclasses.replace(tenant, create_time=self._clock())
        try:
            with self.store.begin() as db:
                db.execute(insert(tenants).values(_tenant_row(tenant)))
        except IntegrityError:
            raise AlreadyExists(f"tenant {tenant.name!r} exists", reason="TENANT_EXISTS",
                                metadata={"tenant": tenant.name}) from None
        return tenant

    def ensure_tenant(self, name: str) -> Tenant:
        """The tenant `name`, created with the defaults when it does not exist."""
        try:
            return self.get_tenant(name)
        except NotFound:
            try:
                return self.create_tenant(Tenant(name))
            except AlreadyExists:
                return self.get_tenant(name)

    def update_tenant(self, tenant: Tenant) -> Tenant:
        check_tenant(tenant)
        values = _tenant_row(tenant)
        del values["name"], values["create_time"]
        with self.store.begin() as db:
            updated = db.execute(update(tenants).where(tenants.c.name == tenant.name).values(values)).rowcount
        if updated == 0:
            raise _no_tenant(tenant.name)
        return self.get_tenant(tenant.name)

    def get_tenant(self, name: str) -> Tenant:
        with self.store.begin() as db:
            row = db.execute(select(tenants).where(tenants.c.name == name)).first()
        if row is None:
            raise _no_tenant(name)
        return _tenant(row)

    def list_tenants(self, after: str = "", limit: int = 100) -> list[Tenant]:
        with self.store.begin() as db:
            rows = db.execute(select(tenants).where(tenants.c.name > after).order_by(tenants.c.name)
                              .limit(limit)).all()
        return [_tenant(r) for r in rows]

    def delete_tenant(self, name: str) -> None:
        """Removes a tenant that has no usable key (revoke them first)."""
        now = self._clock()
        with self.store.begin() as db:
            # The tenant's row is locked: no key may be made between the count and the delete.
            if db.execute(select(tenants.c.name).where(tenants.c.name == name).with_for_update()).first() is None:
                raise _no_tenant(name)
            live = db.execute(select(func.count()).select_from(api_keys).where(
                api_keys.c.tenant == name,
                or_(api_keys.c.revoke_time.is_(None), api_keys.c.revoke_time > now),
                or_(api_keys.c.expire_time.is_(None), api_keys.c.expire_time > now))).scalar_one()
            if live:
                raise FailedPrecondition(f"tenant {name!r} still has {live} usable keys; revoke them first",
                                         reason="TENANT_HAS_KEYS", metadata={"tenant": name, "keys": str(live)})
            db.execute(delete(api_keys).where(api_keys.c.tenant == name))
            db.execute(delete(tenants).where(tenants.c.name == name))

    # ---- keys -------------------------------------------------------------------------

    def create_key(self, tenant: str, role: Role, label: str = "",
                   expire_time: float | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the printed key, which is never seen again."""
        check_label(label)
        now = self._clock()
        if expire_time is not None and not now < expire_time <= now + MAX_SECONDS:
            raise InvalidArgument.field("expire_time", "must be in the future, at most 10 years away")
        key_id, secret = secrets.token_hex(KEY_ID_LENGTH // 2), secrets.token_urlsafe(SECRET_BYTES)
        key = ApiKey(key_id, tenant, role, label, now, expire_time)
        with self.store.begin() as db:
            # Shares the tenant's row lock with `delete_tenant`: the tenant cannot go meanwhile.
            if db.execute(select(tenants.c.name).where(tenants.c.name == tenant)
                          .with_for_update(read=True)).first() is None:
                raise _no_tenant(tenant)
            db.execute(insert(api_keys).values(key_id=key_id, tenant=tenant, role=role.value, label=label,
                                               secret_hash=hash_secret(secret), create_time=now,
                                               expire_time=expire_time, revoke_time=None))
        return key, f"{KEY_PREFIX}{key_id}-{secret}"

    def lookup(self, key_id: str) -> tuple[ApiKey, str, Tenant] | None:
        """The key, its secret's hash and its tenant, for the authenticator."""
        query = select(api_keys, tenants).join(tenants, tenants.c.name == api_keys.c.tenant) \
            .where(api_keys.c.key_id == key_id)
        with self.store.begin() as db:
            row = db.execute(query).first()
        if row is None:
            return None
        return _key(row), row.secret_hash, _tenant(row, name=row.tenant)

    def get_key(self, key_id: str) -> ApiKey:
        with self.store.begin() as db:
            row = db.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise NotFound(f"no API key {key_id[:64]!r}", reason="API_KEY_NOT_FOUND",
                           metadata={"key_id": key_id[:64]})
        return _key(row)

    def list_keys(self, tenant: str = "", after: str = "", limit: int = 100) -> list[ApiKey]:
        query = select(api_keys).where(api_keys.c.key_id > after)
        if tenant:
            query = query.where(api_keys.c.tenant == tenant)
        with self.store.begin() as db:
            rows = db.execute(query.order_by(api_keys.c.key_id).limit(limit)).all()
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        now = self._clock()
        with self.store.begin() as db:
            db.execute(update(api_keys).where(
                api_keys.c.key_id == key_id, or_(api_keys.c.revoke_time.is_(None), api_keys.c.revoke_time > now))
                .values(revoke_time=now))
        return self.get_key(key_id)

    def rotate_key(self, key_id: str, grace_seconds: float) -> tuple[ApiKey, str, ApiKey]:
        """A new key like `key_id`; the old one stops working `grace_seconds` from now.
        Returns (new key, its printed form, the old key as it now is)."""
        if not 0 <= grace_seconds <= 30 * 86400:
            raise InvalidArgument.field("grace_period", "must be between 0 and 30 days")
        old = self.get_key(key_id)
        now = self._clock()
        why = old.why_unusable(now)
        if why:
            raise FailedPrecondition(f"API key {key_id} is {why}; create a new one",
                                     reason="API_KEY_NOT_USABLE", metadata={"key_id": key_id})
        new, printed = self.create_key(old.tenant, old.role, old.label, old.expire_time)
        with self.store.begin() as db:
            db.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(revoke_time=now + grace_seconds))
        return new, printed, self.get_key(key_id)


def _no_tenant(name: str) -> NotFound:
    return NotFound(f"no tenant {name[:64]!r}", reason="TENANT_NOT_FOUND", metadata={"tenant": name[:64]})


def _tenant_row(t: Tenant) -> dict:
    return dict(name=t.name, weight=t.weight, priority_ceiling=t.priority_ceiling,
                max_concurrent=t.quota.max_concurrent, requests_per_minute=t.quota.requests_per_minute,
                tokens_per_minute=t.quota.tokens_per_minute, create_time=t.create_time)


def _tenant(row, name: str | None = None) -> Tenant:
    # In a key joined with its tenant, `create_time` is the key's; the tenant's is not needed there.
    return Tenant(name or row.name, row.weight, row.priority_ceiling,
                  Quota(row.max_concurrent, row.requests_per_minute, row.tokens_per_minute),
                  row.create_time if name is None else 0.0)


def _key(row) -> ApiKey:
    return ApiKey(row.key_id, row.tenant, Role(row.role), row.label, row.create_time, row.expire_time,
                  row.revoke_time)
