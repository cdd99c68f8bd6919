"""Tenants and API keys, persisted in SQLite and shared by every process that opens the file.

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
import sqlite3
import threading
import time
from dataclasses import dataclass

from .errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound

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
    """Tenants and keys in one SQLite file. Thread-safe; every write is one transaction."""

    def __init__(self, db_path: str, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, weight REAL NOT NULL, "
            "priority_ceiling INTEGER NOT NULL, max_concurrent INTEGER NOT NULL, "
            "requests_per_minute INTEGER NOT NULL, tokens_per_minute INTEGER NOT NULL, create_time REAL NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
            "role TEXT NOT NULL, label TEXT NOT NULL, secret_hash TEXT NOT NULL, create_time REAL NOT NULL, "
            "expire_time REAL, revoke_time REAL)")

    def close(self) -> None:
        self._db.close()

    # ---- tenants ----------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant) -> Tenant:
        check_tenant(tenant)
        tenant = dataclasses.replace(tenant, create_time=self._clock())
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?)", _tenant_row(tenant))
            except sqlite3.IntegrityError:
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
        with self._lock:
            cursor = self._db.execute(
                "UPDATE tenants SET weight=?, priority_ceiling=?, max_concurrent=?, requests_per_minute=?, "
                "tokens_per_minute=? WHERE name=?", (*_tenant_row(tenant)[1:6], tenant.name))
        if cursor.rowcount == 0:
            raise _no_tenant(tenant.name)
        return self.get_tenant(tenant.name)

    def get_tenant(self, name: str) -> Tenant:
        with self._lock:
            row = self._db.execute("SELECT * FROM tenants WHERE name=?", (name,)).fetchone()
        if row is None:
            raise _no_tenant(name)
        return _tenant(row)

    def list_tenants(self, after: str = "", limit: int = 100) -> list[Tenant]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tenants WHERE name > ? ORDER BY name LIMIT ?",
                                    (after, limit)).fetchall()
        return [_tenant(r) for r in rows]

    def delete_tenant(self, name: str) -> None:
        """Removes a tenant that has no usable key (revoke them first)."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")     # no key may be made between the count and the delete
            live = self._db.execute(
                "SELECT COUNT(*) FROM api_keys WHERE tenant=? AND (revoke_time IS NULL OR revoke_time > ?) "
                "AND (expire_time IS NULL OR expire_time > ?)", (name, now, now)).fetchone()[0]
            if live:
                self._db.execute("ROLLBACK")
                raise FailedPrecondition(f"tenant {name!r} still has {live} usable keys; revoke them first",
                                         reason="TENANT_HAS_KEYS", metadata={"tenant": name, "keys": str(live)})
            deleted = self._db.execute("DELETE FROM tenants WHERE name=?", (name,)).rowcount
            self._db.execute("DELETE FROM api_keys WHERE tenant=?", (name,))
            self._db.execute("COMMIT")
        if not deleted:
            raise _no_tenant(name)

    # ---- keys -------------------------------------------------------------------------

    def create_key(self, tenant: str, role: Role, label: str = "",
                   expire_time: float | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the printed key, which is never seen again."""
        check_label(label)
        self.get_tenant(tenant)
        now = self._clock()
        if expire_time is not None and not now < expire_time <= now + MAX_SECONDS:
            raise InvalidArgument.field("expire_time", "must be in the future, at most 10 years away")
        key_id, secret = secrets.token_hex(KEY_ID_LENGTH // 2), secrets.token_urlsafe(SECRET_BYTES)
        key = ApiKey(key_id, tenant, role, label, now, expire_time)
        with self._lock:
            self._db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (key_id, tenant, role.value, label, hash_secret(secret), now, expire_time, None))
        return key, f"{KEY_PREFIX}{key_id}-{secret}"

    def lookup(self, key_id: str) -> tuple[ApiKey, str, Tenant] | None:
        """The key, its secret's hash and its tenant, for the authenticator."""
        with self._lock:
            row = self._db.execute(
                "SELECT k.*, t.* FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.key_id=?",
                (key_id,)).fetchone()
        if row is None:
            return None
        return _key(row[:8]), row[4], _tenant(row[8:])

    def get_key(self, key_id: str) -> ApiKey:
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id[:64]!r}", reason="API_KEY_NOT_FOUND",
                           metadata={"key_id": key_id[:64]})
        return _key(row)

    def list_keys(self, tenant: str = "", after: str = "", limit: int = 100) -> list[ApiKey]:
        query, args = "SELECT * FROM api_keys WHERE key_id > ?", [after]
        if tenant:
            query, args = query + " AND tenant = ?", [*args, tenant]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY key_id LIMIT ?", (*args, limit)).fetchall()
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        now = self._clock()
        with self._lock:
            self._db.execute("UPDATE api_keys SET revoke_time=? WHERE key_id=? AND "
                             "(revoke_time IS NULL OR revoke_time > ?)", (now, key_id, now))
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
        end = now + grace_seconds
        with self._lock:
            self._db.execute("UPDATE api_keys SET revoke_time=? WHERE key_id=?", (end, key_id))
        return new, printed, self.get_key(key_id)


def _no_tenant(name: str) -> NotFound:
    return NotFound(f"no tenant {name[:64]!r}", reason="TENANT_NOT_FOUND", metadata={"tenant": name[:64]})


def _tenant_row(t: Tenant) -> tuple:
    return (t.name, t.weight, t.priority_ceiling, t.quota.max_concurrent, t.quota.requests_per_minute,
            t.quota.tokens_per_minute, t.create_time)


def _tenant(row) -> Tenant:
    return Tenant(row[0], row[1], row[2], Quota(row[3], row[4], row[5]), row[6])


def _key(row) -> ApiKey:
    return ApiKey(row[0], row[1], Role(row[2]), row[3], row[5], row[6], row[7])
