"""Which RPCs are traced: the services' own filter decides as OpenTelemetry's `filters.negate(any_of(...))`
of the same conditions would, for the call details of the server and of the asyncio client."""

from __future__ import annotations

from collections import namedtuple

import grpc
import pytest
from opentelemetry.instrumentation.grpc import filters

from llmos.common.telemetry import PERIODIC_METHODS, _not_plumbing

HandlerDetails = namedtuple("HandlerDetails", ["method", "invocation_metadata"])

METHODS = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
           "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
           "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
           "/llmos.v1.GatewayService/Generate", "/llmos.v1.SchedulerService/AdmitGeneration",
           "/llmos.v1.WorkerService/GetWorkerStatus", "/llmos.v1.ResourceService/RenewLeases",
           "/llmos.v1.RegistryService/RegisterWorker", "/llmos.v1.RegistryService/ListWorkers",
           "/llmos.v1.RegistryService/GetModel", "/llmos.v1.MonitorService/Watch", ""]


@pytest.mark.parametrize("method", METHODS)
def test_the_filter_traces_what_opentelemetrys_filters_would(method):
    reference = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"),
                                              *(filters.method_name(m) for m in PERIODIC_METHODS)))
    ours = _not_plumbing()
    server = HandlerDetails(method, ())
    client = grpc.aio.ClientCallDetails(method.encode(), None, None, None, None)   # (a bytes name, as grpc gives)
    assert ours(server) == reference(server)
    assert ours(client) == reference(client)
    if method:
        assert ours(server) == (method.startswith("/llmos.v1.") and method.rsplit("/", 1)[1] not in PERIODIC_METHODS)
