"""Every method of every service, called as every kind of caller, answers as the table says.

The methods come from the generated descriptors, so an RPC added without a table entry fails
here. Callers: nobody (no key; on internal ports the CLI's certificate, which grants nothing),
a user key, an admin key, and each service's own certificate. An allowed call may still fail
for its own reasons (an empty request is INVALID_ARGUMENT or NOT_FOUND); a refused one is
UNAUTHENTICATED or PERMISSION_DENIED with the refusal's reason.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import symbol_database

from llmos.common import authz
from llmos.common.keystore import Role
from llmos.v1 import (
    gateway_pb2,
    identity_pb2,
    monitor_pb2,
    registry_pb2,
    resources_pb2,
    scheduler_pb2,
    worker_pb2,
)

from .test_generate import error_info

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Which process serves each service.
SERVES = {"GatewayService": "gateway", "IdentityService": "gateway", "SchedulerService": "scheduler",
          "RegistryService": "registry", "ResourceService": "resources", "WorkerService": "worker",
          "MonitorService": "monitor"}
FILES = (gateway_pb2, identity_pb2, monitor_pb2, registry_pb2, resources_pb2, scheduler_pb2, worker_pb2)
SERVICES = ("gateway", "scheduler", "registry", "resources", "worker", "monitor")
REFUSALS = {"API_KEY_MISSING", "API_KEY_INVALID", "ROLE_REQUIRED", "CALLER_NOT_ALLOWED", "METHOD_NOT_ALLOWED"}


def every_method():
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service, method


async def test_every_method_of_every_service_has_a_rule():
    methods = {f"/{service.full_name}/{method.name}" for service, method in every_method()}
    assert methods - set(authz.TABLE) == set(), "methods without an authorization rule"
    assert set(authz.TABLE) - methods == set(), "rules for methods that do not exist"
    assert {service.name for service, _ in every_method()} == set(SERVES)


def allowed(rule: authz.Rule, caller: str) -> bool:
    if caller == "admin":
        return rule.role in (Role.USER, Role.ADMIN)
    if caller == "user":
        return rule.role is Role.USER
    if caller == "nobody":
        return False
    return caller in rule.services


async def call(channel: grpc.aio.Channel, service, method) -> grpc.StatusCode | tuple[grpc.StatusCode, str]:
    """Calls the method with an empty request; its status code, and the reason when refused."""
    request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
    response_type = symbol_database.Default().GetSymbol(method.output_type.full_name)
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            stream = channel.stream_stream(path, request_serializer=request_type.SerializeToString,
                                           response_deserializer=response_type.FromString)
            async for _ in stream(iter([request_type()]), timeout=1.0):
                pass
        elif method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=request_type.SerializeToString,
                                          response_deserializer=response_type.FromString)
            async for _ in stream(request_type(), timeout=1.0):
                pass
        else:
            await channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                                      response_deserializer=response_type.FromString)(request_type(), timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            reason = error_info(exc)["ErrorInfo"].reason
            if reason in REFUSALS:
                return exc.code(), reason
        return exc.code()
    return grpc.StatusCode.OK


async def test_each_answer_matches_the_table(stack):
    user_key = await stack.user_key("authz-user")
    channels = {}
    for caller in ("nobody", "user", "admin", *SERVICES):
        for target in SERVICES:
            if caller in SERVICES:
                channels[caller, target] = stack.suite.channel(target, api_key="", tls_as=caller)
            else:
                key = {"nobody": "", "user": user_key, "admin": None}[caller]
                channels[caller, target] = stack.suite.channel(target, api_key=key)
    mismatches, answered = [], 0
    try:
        for service, method in every_method():
            path = f"/{service.full_name}/{method.name}"
            rule = authz.TABLE[path]
            for caller in ("nobody", "user", "admin", *SERVICES):
                target = SERVES[service.name]
                if caller in SERVICES and target == "gateway":
                    continue        # the gateway's public port takes no certificates: keys only
                answer = await call(channels[caller, target], service, method)
                answered += 1
                refused = isinstance(answer, tuple)
                if refused == allowed(rule, caller):
                    mismatches.append((path, caller, answer, rule.describe()))
                elif refused:
                    code, reason = answer
                    if rule.role is None:         # internal: no key would do
                        expected = "CALLER_NOT_ALLOWED"
                    elif caller == "nobody":
                        expected = "API_KEY_MISSING"
                    elif caller == "user":
                        expected = "ROLE_REQUIRED"
                    else:                         # a service's certificate where a key is wanted
                        expected = "CALLER_NOT_ALLOWED"
                    if reason != expected:
                        mismatches.append((path, caller, answer, f"expected {expected}"))
    finally:
        await asyncio.gather(*(c.close() for c in channels.values()))
    assert not mismatches, "\n".join(map(str, mismatches))
    # Every method was called by every kind of caller (service certificates not on the public port).
    callers = 3 + len(SERVICES)
    assert answered == sum(3 if SERVES[service.name] == "gateway" else callers for service, _ in every_method())


async def test_health_and_reflection_stay_open_and_internal_ports_want_a_certificate(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name in SERVICES:
        channel = stack.suite.channel(name, api_key="")
        try:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            listed = [s.name async for r in stream for s in r.list_services_response.service]
            assert "grpc.health.v1.Health" in listed
        finally:
            await channel.close()
    # No certificate at all on an internal port: the handshake fails (UNAVAILABLE).
    for name in ("scheduler", "registry", "resources", "worker", "monitor"):
        async with grpc.aio.insecure_channel(stack.addresses[name]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_what_an_outsider_could_do_is_refused(stack):
    """The probe of the first round, with a user key: each of these succeeded once."""
    user = await stack.user_key("outsider")
    as_user = {name: stack.suite.channel(name, api_key=user) for name in SERVICES}
    attempts = [
        ("scheduler", scheduler_pb2.AdmitGenerationRequest(request_id="hold-1", model="tiny", max_tokens=1),
         "SchedulerService", "AdmitGeneration", scheduler_pb2.AdmitGenerationResponse),
        ("scheduler", scheduler_pb2.FinishGenerationRequest(request_id="x", worker_failed=True),
         "SchedulerService", "FinishGeneration", scheduler_pb2.FinishGenerationResponse),
        ("scheduler", scheduler_pb2.FinishGenerationsRequest(generations=[{"request_id": "x", "worker_failed": True}]),
         "SchedulerService", "FinishGenerations", scheduler_pb2.FinishGenerationsResponse),
        ("registry", registry_pb2.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:1",
                                                        loaded_models=["tiny:latest"]),
         "RegistryService", "RegisterWorker", registry_pb2.RegisterWorkerResponse),
        ("resources", resources_pb2.AcquireLeaseRequest(holder="me", bytes=2**40),
         "ResourceService", "AcquireLease", resources_pb2.AcquireLeaseResponse),
        ("resources", resources_pb2.ReleaseLeaseRequest(name="leases/anything"),
         "ResourceService", "ReleaseLease", resources_pb2.ReleaseLeaseResponse),
        ("worker", worker_pb2.StartModelRequest(model="evil:latest", path="/tmp"),
         "WorkerService", "StartModel", worker_pb2.StartModelResponse),
        ("registry", registry_pb2.UnloadModelRequest(name="tiny"),
         "RegistryService", "UnloadModel", registry_pb2.UnloadModelResponse),
        ("registry", registry_pb2.DeleteModelRequest(name="tiny"),
         "RegistryService", "DeleteModel", registry_pb2.DeleteModelResponse),
    ]
    try:
        for target, request, service, method, response_type in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await as_user[target].unary_unary(
                    f"/llmos.v1.{service}/{method}", request_serializer=type(request).SerializeToString,
                    response_deserializer=response_type.FromString)(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, caught.value)
            assert error_info(caught.value)["ErrorInfo"].reason in ("CALLER_NOT_ALLOWED", "ROLE_REQUIRED")
    finally:
        await asyncio.gather(*(c.close() for c in as_user.values()))
    # The model is still there and still serves.
    responses = [r async for r in stack.gateway.Generate(gateway_pb2.GenerateRequest(
        model="tiny", prompt="still here", sampling={"max_tokens": 2}))]
    assert responses[-1].usage.completion_tokens == 2


async def test_a_worker_certificate_acts_only_as_its_own_worker(stack):
    from llmos.common.tls import LocalCA

    identity = stack.suite.identity
    # Another genuine worker of the cluster (its certificate signed by the same CA), named "evil".
    LocalCA(identity.tls_dir("ca")).issue(identity.tls_dir("worker-evil"), "worker", "evil")
    evil_registry = stack.suite.channel("registry", api_key="", tls_as="worker-evil")
    evil_resources = stack.suite.channel("resources", api_key="", tls_as="worker-evil")
    try:
        leases = (await stack.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=5)).leases
        own = next(lease for lease in leases if lease.holder.startswith("worker/w1/model/"))
        attempts = [
            (evil_registry, "RegistryService", "RegisterWorker", registry_pb2.RegisterWorkerResponse,
             registry_pb2.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:1", loaded_models=["tiny:latest"])),
            (evil_resources, "ResourceService", "ReleaseLease", resources_pb2.ReleaseLeaseResponse,
             resources_pb2.ReleaseLeaseRequest(name=own.name)),
            (evil_resources, "ResourceService", "RenewLeases", resources_pb2.RenewLeasesResponse,
             resources_pb2.RenewLeasesRequest(holder_prefix="worker/w1/", in_use_bytes=1)),
        ]
        for channel, service, method, response_type, request in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(f"/llmos.v1.{service}/{method}",
                                          request_serializer=type(request).SerializeToString,
                                          response_deserializer=response_type.FromString)(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, caught.value)
            assert error_info(caught.value)["ErrorInfo"].reason == "WORKER_IDENTITY_MISMATCH"
        leases = (await stack.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=5)).leases
        assert own.name in {lease.name for lease in leases}
        workers = (await stack.registry.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=5)).workers
        assert [w.address for w in workers if w.worker_id == "w1"] == [stack.addresses["worker"]]
    finally:
        await evil_registry.close()
        await evil_resources.close()
