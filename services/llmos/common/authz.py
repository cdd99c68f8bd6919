"""Who may call what: one table for every method of every llmos service. Default deny.

A rule names the least role an API key needs (`user` or `admin`), the services whose
certificate may call it, or both (either suffices). A method missing from the table is
refused. Health and server reflection stay open, so probes and grpcurl-style tools work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .keystore import Role

# The certificate of the command line (and other tools): it proves the connection, and grants
# nothing by itself; what the caller may do comes from its API key.
CLI = "cli"

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


@dataclass(frozen=True)
class Rule:
    role: Role | None = None                  # least key role allowed; None: no key suffices
    services: frozenset[str] = frozenset()    # services whose certificate may call it

    def describe(self) -> str:
        parts = [self.role.value] if self.role else []
        return " or ".join(parts + [f"service:{s}" for s in sorted(self.services)]) or "nobody"


def _rule(role: Role | None = None, *services: str) -> Rule:
    return Rule(role, frozenset(services))


USER, ADMIN = Role.USER, Role.ADMIN
_V1 = "/llmos.v1."

TABLE: dict[str, Rule] = {
    # The public door.
    _V1 + "GatewayService/Generate": _rule(USER),
    _V1 + "GatewayService/ListAvailableModels": _rule(USER),
    _V1 + "GatewayService/Embed": _rule(USER),
    _V1 + "GatewayService/Classify": _rule(USER),
    _V1 + "GatewayService/Score": _rule(USER),
    # Keys and tenants.
    **{_V1 + f"IdentityService/{m}": _rule(ADMIN) for m in (
        "CreateTenant", "GetTenant", "UpdateTenant", "ListTenants", "DeleteTenant",
        "CreateApiKey", "ListApiKeys", "RevokeApiKey", "RotateApiKey")},
    # Admission and its accounting are the gateway's; a user may ask about their own requests.
    _V1 + "SchedulerService/AdmitGeneration": _rule(None, "gateway"),
    _V1 + "SchedulerService/FinishGeneration": _rule(None, "gateway"),
    _V1 + "SchedulerService/FinishGenerations": _rule(None, "gateway"),
    _V1 + "SchedulerService/GetSchedulerStats": _rule(ADMIN, "monitor"),
    _V1 + "SchedulerService/GetRequestStatus": _rule(USER, "gateway", "monitor"),
    # The catalog: changes are the admins'; the scheduler loads on a cold start.
    _V1 + "RegistryService/ImportModel": _rule(ADMIN),
    _V1 + "RegistryService/GetModel": _rule(ADMIN, "scheduler", "gateway"),
    _V1 + "RegistryService/ListModels": _rule(ADMIN, "gateway", "monitor", "scheduler"),   # (a new leader's look)
    _V1 + "RegistryService/LoadModel": _rule(ADMIN, "scheduler"),
    _V1 + "RegistryService/UnloadModel": _rule(ADMIN),
    _V1 + "RegistryService/DeleteModel": _rule(ADMIN),
    _V1 + "RegistryService/RegisterWorker": _rule(None, "worker"),
    _V1 + "RegistryService/ListWorkers": _rule(ADMIN, "monitor", "scheduler"),
    _V1 + "RegistryService/WatchModels": _rule(ADMIN, "monitor"),
    # Aliases and their flips are the admins'.
    **{_V1 + f"RegistryService/{m}": _rule(ADMIN) for m in ("SetAlias", "DeleteAlias")},
    **{_V1 + f"RegistryService/{m}": _rule(ADMIN, "monitor") for m in ("GetAlias", "ListAliases")},
    # Memory leases are the workers' own; the registry reads the inventory to place models.
    _V1 + "ResourceService/ListNodes": _rule(ADMIN, "registry", "monitor"),
    _V1 + "ResourceService/AcquireLease": _rule(None, "worker"),
    _V1 + "ResourceService/ReleaseLease": _rule(None, "worker"),
    _V1 + "ResourceService/ListLeases": _rule(ADMIN, "monitor"),
    _V1 + "ResourceService/RenewLeases": _rule(None, "worker"),
    # Workers take orders from the registry and streams from the gateway.
    _V1 + "WorkerService/StartModel": _rule(None, "registry"),
    _V1 + "WorkerService/StopModel": _rule(None, "registry"),
    # (An admin may stream from a worker directly: `llmos bench` measures the worker alone.)
    _V1 + "WorkerService/GenerateTokens": _rule(ADMIN, "gateway"),
    _V1 + "WorkerService/GenerateMany": _rule(ADMIN, "gateway"),
    _V1 + "WorkerService/Pool": _rule(ADMIN, "gateway"),
    _V1 + "WorkerService/GetWorkerStatus": _rule(ADMIN, "scheduler", "registry", "monitor"),
    _V1 + "MonitorService/GetClusterHealth": _rule(ADMIN),
    _V1 + "MonitorService/Watch": _rule(ADMIN),
}


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


# The gateway's HTTP door (OpenAI's API, `llmos.gateway.openai_api`), by "METHOD /path": callers
# bring keys only. A route missing here is refused.
HTTP_TABLE: dict[str, Rule] = {
    "POST /v1/chat/completions": _rule(USER),
    "POST /v1/completions": _rule(USER),
    "GET /v1/models": _rule(USER),
    "POST /v1/embeddings": _rule(USER),
    "POST /v1/classify": _rule(USER),
    "POST /v1/score": _rule(USER),
    "POST /v1/rerank": _rule(USER),
}
