"""gRPC face of the key store: tenants and API keys (`IdentityService`), admins only."""

from __future__ import annotations

import dataclasses
import time

from llmos.common.convert import optional_seconds, quota_from_proto, quota_to_proto, timestamp
from llmos.common.errors import FailedPrecondition, InvalidArgument
from llmos.common.keystore import ApiKey, KeyStore, Role, Tenant
from llmos.common.paging import page_size
from llmos.common.store import off_loop
from llmos.v1 import identity_pb2, identity_pb2_grpc

_ROLE_TO_PROTO = {Role.USER: identity_pb2.ROLE_USER, Role.ADMIN: identity_pb2.ROLE_ADMIN}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}
_TENANT_FIELDS = ("weight", "priority_ceiling", "quota")


def tenant_to_proto(t: Tenant) -> identity_pb2.Tenant:
    return identity_pb2.Tenant(
        name=t.name, weight=t.weight, priority_ceiling=t.priority_ceiling, create_time=timestamp(t.create_time),
        quota=quota_to_proto(t.quota))


def tenant_from_proto(t: identity_pb2.Tenant, base: Tenant | None = None, fields=_TENANT_FIELDS) -> Tenant:
    base = base or Tenant(t.name)
    values = {"weight": t.weight or 1.0,
              "priority_ceiling": t.priority_ceiling if t.HasField("priority_ceiling") else 10,
              "quota": quota_from_proto(t.quota)}
    return dataclasses.replace(base, **{f: values[f] for f in fields})


def key_to_proto(k: ApiKey, now: float) -> identity_pb2.ApiKey:
    why = k.why_unusable(now)
    if why == "revoked":
        state = identity_pb2.ApiKey.STATE_REVOKED
    elif why == "expired":
        state = identity_pb2.ApiKey.STATE_EXPIRED
    elif k.revoke_time is not None:
        state = identity_pb2.ApiKey.STATE_GRACE
    else:
        state = identity_pb2.ApiKey.STATE_ACTIVE
    out = identity_pb2.ApiKey(key_id=k.key_id, tenant=k.tenant, role=_ROLE_TO_PROTO[k.role], label=k.label,
                              create_time=timestamp(k.create_time), state=state)
    if k.expire_time is not None:
        out.expire_time.CopyFrom(timestamp(k.expire_time))
    if k.revoke_time is not None:
        out.revoke_time.CopyFrom(timestamp(k.revoke_time))
    return out


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, store: KeyStore | None) -> None:
        self._store_or_none = store

    @property
    def store(self) -> KeyStore:
        if self._store_or_none is None:
            raise FailedPrecondition("this gateway has no key store (store_url or identity_db)", reason="NO_KEY_STORE")
        return self._store_or_none

    async def CreateTenant(self, request, context):
        return identity_pb2.CreateTenantResponse(
            tenant=tenant_to_proto(await off_loop(self.store.create_tenant, tenant_from_proto(request.tenant))))

    async def GetTenant(self, request, context):
        tenant = await off_loop(self.store.get_tenant, request.name)
        return identity_pb2.GetTenantResponse(tenant=tenant_to_proto(tenant))

    async def UpdateTenant(self, request, context):
        paths = list(request.update_mask.paths) or list(_TENANT_FIELDS)
        unknown = [p for p in paths if p not in _TENANT_FIELDS]
        if unknown:
            raise InvalidArgument.field("update_mask", f"unknown field {unknown[0][:64]!r}; "
                                        f"one of {', '.join(_TENANT_FIELDS)}")
        current = await off_loop(self.store.get_tenant, request.tenant.name)
        updated = await off_loop(self.store.update_tenant, tenant_from_proto(request.tenant, current, paths))
        return identity_pb2.UpdateTenantResponse(tenant=tenant_to_proto(updated))

    async def ListTenants(self, request, context):
        size = page_size(request.page_size)
        tenants = await off_loop(self.store.list_tenants, request.page_token, size + 1)
        return identity_pb2.ListTenantsResponse(
            tenants=[tenant_to_proto(t) for t in tenants[:size]],
            next_page_token=tenants[size - 1].name if len(tenants) > size else "")

    async def DeleteTenant(self, request, context):
        await off_loop(self.store.delete_tenant, request.name)
        return identity_pb2.DeleteTenantResponse()

    async def CreateApiKey(self, request, context):
        role = _ROLE_FROM_PROTO.get(request.role)
        if role is None:
            raise InvalidArgument.field("role", "is required: ROLE_USER or ROLE_ADMIN")
        expire = optional_seconds(request, "expire_time")
        key, secret = await off_loop(self.store.create_key, request.tenant, role, request.label, expire)
        return identity_pb2.CreateApiKeyResponse(api_key=key_to_proto(key, time.time()), secret=secret)

    async def ListApiKeys(self, request, context):
        size = page_size(request.page_size)
        keys = await off_loop(self.store.list_keys, request.tenant, request.page_token, size + 1)
        now = time.time()
        return identity_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(k, now) for k in keys[:size]],
            next_page_token=keys[size - 1].key_id if len(keys) > size else "")

    async def RevokeApiKey(self, request, context):
        revoked = await off_loop(self.store.revoke_key, request.key_id)
        return identity_pb2.RevokeApiKeyResponse(api_key=key_to_proto(revoked, time.time()))

    async def RotateApiKey(self, request, context):
        grace = optional_seconds(request, "grace_period") or 0.0
        new, secret, old = await off_loop(self.store.rotate_key, request.key_id, grace)
        now = time.time()
        return identity_pb2.RotateApiKeyResponse(api_key=key_to_proto(new, now), secret=secret,
                                                 previous=key_to_proto(old, now))


def register(host, store: KeyStore | None) -> None:
    servicer = IdentityServicer(store)
    host.add(identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
             lambda server: identity_pb2_grpc.add_IdentityServiceServicer_to_server(servicer, server))
