"""Tenants, API keys and their checks: the key store on a real SQLite file and a real
PostgreSQL, the authenticator with fake clocks."""

import pytest

from llmos.common.auth import Authenticator
from llmos.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from llmos.common.keystore import KeyStore, Quota, Role, Tenant, parse_key
from llmos.common.store import Store
from tests.support.clock import FakeClock


@pytest.fixture
def clock():
    return FakeClock(1_000_000.0)


@pytest.fixture
def store(store_url, clock):
    store = KeyStore(Store(store_url), clock=clock)
    store.create_tenant(Tenant("acme", weight=2.0, priority_ceiling=3, quota=Quota(4, 60, 1000)))
    yield store
    store.close()


def test_a_key_is_shown_once_and_only_its_hash_is_stored(store):
    key, printed = store.create_key("acme", Role.USER, "ci")
    key_id, secret = parse_key(printed)
    assert key_id == key.key_id and len(secret) >= 43
    with store.store.engine.connect() as db:                # every stored column, read directly
        rows = db.exec_driver_sql("SELECT * FROM api_keys").fetchall()
    assert rows and all(secret not in str(row) for row in rows)
    listed = store.list_keys("acme")
    assert [k.key_id for k in listed] == [key_id] and not hasattr(listed[0], "secret")


def test_tenant_fields_are_range_checked_before_anything_is_stored(store):
    for bad in (Tenant("x" * 1_000_000), Tenant("Acme"), Tenant("ok", weight=0.0), Tenant("ok", priority_ceiling=11),
                Tenant("ok", quota=Quota(tokens_per_minute=-1)), Tenant("ok\n")):
        with pytest.raises(InvalidArgument):
            store.create_tenant(bad)
    assert [t.name for t in store.list_tenants()] == ["acme"]
    with pytest.raises(AlreadyExists):
        store.create_tenant(Tenant("acme"))
    with pytest.raises(NotFound):
        store.create_key("nobody", Role.USER)
    with pytest.raises(InvalidArgument):
        store.create_key("acme", Role.USER, "label\n" * 100)


def test_every_bad_key_is_one_reason_and_a_missing_key_another(store, clock):
    auth = Authenticator(store, clock=clock)
    _, printed = store.create_key("acme", Role.USER)
    assert auth.authenticate(f"Bearer {printed}").tenant.name == "acme"
    with pytest.raises(Unauthenticated) as missing:
        auth.authenticate(None)
    assert missing.value.reason == "API_KEY_MISSING"
    wrong = printed[:-4] + ("AAAA" if not printed.endswith("AAAA") else "BBBB")
    unknown = "llmos-0123456789abcdef-" + "A" * 43
    for bad in ("Bearer nonsense", f"Basic {printed}", f"Bearer {wrong}", f"Bearer {unknown}",
                "Bearer " + "x" * 100_000):
        with pytest.raises(Unauthenticated) as caught:
            auth.authenticate(bad)
        assert caught.value.reason == "API_KEY_INVALID" and caught.value.message == "the API key is not valid"


def test_a_key_seen_lately_works_through_a_store_outage_for_a_while(store, clock):
    from llmos.common.auth import STALE_SECONDS
    from llmos.common.errors import Unavailable

    class Down:
        def lookup(self, key_id):
            raise Unavailable("the store cannot be reached", reason="STORE_UNAVAILABLE")

    now = FakeClock(0.0)
    key, printed = store.create_key("acme", Role.USER)
    _, never_seen = store.create_key("acme", Role.USER)
    auth = Authenticator(store, refresh_seconds=2.0, clock=clock, monotonic=now)
    assert auth.authenticate(f"Bearer {printed}").key_id == key.key_id
    auth._store = Down()                                  # the store goes away
    now.now = 10.0
    assert auth.authenticate(f"Bearer {printed}").key_id == key.key_id
    with pytest.raises(Unavailable):                      # a key never seen cannot be checked
        auth.authenticate(f"Bearer {never_seen}")
    now.now = STALE_SECONDS + 1
    with pytest.raises(Unavailable):                      # nor one seen too long ago
        auth.authenticate(f"Bearer {printed}")


def test_revoked_and_expired_keys_stop_working_within_the_refresh(store, clock):
    now = FakeClock(0.0)
    auth = Authenticator(store, refresh_seconds=2.0, clock=clock, monotonic=now)
    key, printed = store.create_key("acme", Role.USER, expire_time=clock.now + 60)
    assert auth.authenticate(f"Bearer {printed}").key_id == key.key_id
    store.revoke_key(key.key_id)
    now.now = 1.9                  # the record read at 0 is still trusted
    auth.authenticate(f"Bearer {printed}")
    now.now = 2.0
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {printed}")
    other, other_printed = store.create_key("acme", Role.ADMIN, expire_time=clock.now + 60)
    assert auth.authenticate(f"Bearer {other_printed}").role is Role.ADMIN
    clock.now += 60
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {other_printed}")


def test_rotation_keeps_the_old_key_for_its_grace_period(store, clock):
    auth = Authenticator(store, refresh_seconds=0.0, clock=clock)
    old, old_printed = store.create_key("acme", Role.ADMIN, "deploy")
    new, new_printed, previous = store.rotate_key(old.key_id, grace_seconds=2.0)
    assert (new.tenant, new.role, new.label) == ("acme", Role.ADMIN, "deploy") and new.key_id != old.key_id
    assert previous.revoke_time == clock.now + 2.0
    clock.now += 1.9
    auth.authenticate(f"Bearer {old_printed}")
    auth.authenticate(f"Bearer {new_printed}")
    clock.now += 0.1
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {old_printed}")
    auth.authenticate(f"Bearer {new_printed}")
    with pytest.raises(FailedPrecondition):      # a key past its grace cannot be rotated again
        store.rotate_key(old.key_id, 0)


def test_a_tenant_with_usable_keys_cannot_be_removed(store):
    key, _ = store.create_key("acme", Role.USER)
    with pytest.raises(FailedPrecondition) as caught:
        store.delete_tenant("acme")
    assert caught.value.reason == "TENANT_HAS_KEYS"
    store.revoke_key(key.key_id)
    store.delete_tenant("acme")
    assert store.list_keys("acme") == [] and store.list_tenants() == []


def test_updates_change_the_record_every_reader_sees(store, store_url, clock):
    other = KeyStore(Store(store_url), clock=clock)      # another gateway's view
    try:
        store.update_tenant(Tenant("acme", weight=5.0, priority_ceiling=-2, quota=Quota(1, 2, 3)))
        assert other.get_tenant("acme").quota == Quota(1, 2, 3) and other.get_tenant("acme").weight == 5.0
    finally:
        other.close()


class FakeContext:
    def __init__(self, metadata=(), peer_spiffe_id: str = "") -> None:
        self._metadata = tuple(metadata)
        self._auth = {"peer_spiffe_id": [peer_spiffe_id.encode()]} if peer_spiffe_id else {}

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return self._auth

    def peer(self):
        return "ipv4:10.1.2.3:40000"


def test_a_method_without_a_rule_is_refused_whoever_calls(store):
    from llmos.common.auth import Guard
    from llmos.common.authz import TABLE
    from llmos.common.errors import PermissionDenied

    _, admin = store.create_key("acme", Role.ADMIN)
    guard = Guard(Authenticator(store), table={k: v for k, v in TABLE.items() if not k.endswith("/Generate")})
    for context in (FakeContext([("authorization", f"Bearer {admin}")]),
                    FakeContext(peer_spiffe_id="spiffe://llmos/gateway/gateway")):
        with pytest.raises(PermissionDenied) as caught:
            guard.check("/llmos.v1.GatewayService/Generate", context)
        assert caught.value.reason == "METHOD_NOT_ALLOWED"
    # With its rule, the admin gets in and a service certificate does not.
    assert Guard(Authenticator(store)).check("/llmos.v1.GatewayService/Generate",
                                             FakeContext([("authorization", f"Bearer {admin}")])).role is Role.ADMIN
    with pytest.raises(PermissionDenied) as caught:
        Guard(Authenticator(store)).check("/llmos.v1.WorkerService/StartModel",
                                          FakeContext(peer_spiffe_id="spiffe://llmos/gateway/gateway"))
    assert caught.value.reason == "CALLER_NOT_ALLOWED"


def test_failed_authentications_are_limited_per_source_and_key_id(store):
    """Past MAX_AUTH_FAILURES in a window, a source is refused before any key is looked up, with
    the delay until its oldest failure leaves the window; others are not."""
    from llmos.common.auth import MAX_AUTH_FAILURES, Authenticator, Guard
    from llmos.common.errors import ResourceExhausted, Unauthenticated

    now = [1000.0]
    guard = Guard(Authenticator(store))
    guard.failures._clock = lambda: now[0]
    tenant_key = store.create_key("acme", Role.USER)[1]
    method = "/llmos.v1.GatewayService/Generate"
    attacker = FakeContext([("authorization", "Bearer llmos_notakey_000")])
    for _ in range(MAX_AUTH_FAILURES):
        with pytest.raises(Unauthenticated):
            guard.check(method, attacker)
    with pytest.raises(ResourceExhausted) as limited:
        guard.check(method, attacker)
    assert limited.value.reason == "AUTH_RATE_LIMITED" and 0 < limited.value.retry_after <= 10.0
    # Another address with a good key is let in; so is a good key seen lately from the same address
    # (a client behind the same address), but not one never seen; the window passing lets all in.
    other = FakeContext([("authorization", f"Bearer {tenant_key}")])
    other.peer = lambda: "ipv4:10.9.9.9:1"
    assert guard.check(method, other).tenant.name == "acme"
    neighbour = FakeContext([("authorization", f"Bearer {tenant_key}")])
    assert guard.check(method, neighbour).tenant.name == "acme"
    unseen = FakeContext([("authorization", f"Bearer {store.create_key('acme', Role.USER)[1]}")])
    with pytest.raises(ResourceExhausted):
        guard.check(method, unseen)
    now[0] += 10.5
    with pytest.raises(Unauthenticated):
        guard.check(method, attacker)
    assert guard.check(method, unseen).tenant.name == "acme"
