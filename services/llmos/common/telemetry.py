"""OpenTelemetry and logging setup for one service process.

Every service names itself `llmos-<service>`. Spans are exported over OTLP when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
`OTEL_EXPORTER_OTLP_PROTOCOL` picks `grpc` (default) or `http/protobuf`, and the
other `OTEL_*` variables (sampler, batch delays, headers) work as the SDK defines.

Without an exporter (and without a sampler of the user's choosing), a service records no
spans: nothing would read them, and recording them cost a tenth of the time to first token
at 16 concurrent streams (BENCHMARKS.md). Trace and span ids are still made and passed on
(unsampled), so logs keep their trace ids. A trace is decided where it starts: give every
service the same exporter settings (as `llmos up` and the Kubernetes base do).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Status, StatusCode

from .generate_many import METHOD as GENERATE_MANY

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [trace=%(otel_trace_id)s span=%(otel_span_id)s] %(message)s"


# Every span also names its service as an attribute: viewers that keep a span's attributes but
# not its resource (Arize Phoenix) can still tell which process a span comes from.
SERVICE_ATTRIBUTE = "llmos.service"


class _NamesItsService(SpanProcessor):
    def __init__(self, name: str) -> None:
        self._name = name

    def on_start(self, span, parent_context=None) -> None:
        span.set_attribute(SERVICE_ATTRIBUTE, self._name)


def make_tracer_provider(service: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """A tracer provider for `llmos-<service>`, exporting over OTLP when configured."""
    env = os.environ if environ is None else environ
    name = f"llmos-{service}"
    exporting = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    # None: the SDK's own choice (`OTEL_TRACES_SAMPLER`, or every trace a parent does not drop).
    sampler = None if exporting or env.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=sampler)
    provider.add_span_processor(_NamesItsService(name))
    if exporting:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


# The calls services make to each other on a timer (status polls, heartbeats, the monitor's
# rounds): a trace each would bury the requests in a trace viewer.
PERIODIC_METHODS = ("GetWorkerStatus", "GetSchedulerStats", "RegisterWorker", "RenewLeases", "ListWorkers",
                    "ListLeases")


_PLUMBING_SERVICES = ("grpc.health.v1.Health", "grpc.reflection")

# Calls that carry many requests' work for as long as a channel lives (a gateway's generations on a
# worker): each request gets spans of its own, made by hand (`client_span`, `server_span`); a span of
# the call would be a trace of its own hours long.
CARRIER_METHODS = (GENERATE_MANY.rsplit("/", 1)[1],)


def _not_plumbing() -> Callable[[object], bool]:
    """Traces every RPC but health checks, reflection and the periodic polls and heartbeats. (What
    OpenTelemetry's `filters.negate(filters.any_of(...))` of the same conditions says, in one pass over
    the method's name: those filters check each call's details against typing protocols once per
    condition, which was 17% of the gateway's loop at 16 streams.)"""
    def traced(details: object) -> bool:
        method = getattr(details, "method", None) or getattr(details, "full_method", "") or ""
        if isinstance(method, bytes):
            method = method.decode()
        service, _, name = method.lstrip("/").rpartition("/")
        return not (service.startswith(_PLUMBING_SERVICES) or name in PERIODIC_METHODS or name in CARRIER_METHODS)
    return traced


def server_interceptor(provider: TracerProvider) -> object:
    return aio_server_interceptor(tracer_provider=provider, filter_=_not_plumbing())


def client_interceptors(provider: TracerProvider) -> list:
    return aio_client_interceptors(tracer_provider=provider, filter_=_not_plumbing())


def client_span(tracer: trace.Tracer, method: str) -> tuple[trace.Span, list[tuple[str, str]]]:
    """For a call on a bare channel (`Channels.get(traced=False)`): a CLIENT span for `method`
    ("/package.Service/Method") under the current span, named and described as the tracing
    interceptor names its own, and the metadata that carries it to the server. The caller ends it
    (`client_span_failed` first where the call failed)."""
    span = tracer.start_span(method, kind=trace.SpanKind.CLIENT, attributes=_rpc_attributes(method))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, list(carrier.items())


def server_span(tracer: trace.Tracer, method: str, carrier: Mapping[str, str]) -> trace.Span:
    """A SERVER span for one request carried inside a call (`CARRIER_METHODS`), named and described
    as the tracing interceptor names a call's own, the child of the span whose context `carrier`
    holds (what `client_span`'s metadata carried). The caller ends it."""
    return tracer.start_span(method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
                             attributes=_rpc_attributes(method))


def _rpc_attributes(method: str) -> dict[str, str | int]:
    """What the tracing interceptor says of a call of `method` ("/package.Service/Method") that went well."""
    service, name = method.lstrip("/").split("/", 1)
    return {"rpc.system": "grpc", "rpc.grpc.status_code": grpc.StatusCode.OK.value[0], "rpc.method": name,
            "rpc.service": service}


def span_failed(span: trace.Span, code: int, description: str) -> None:
    """A hand-made span (`client_span`, `server_span`) whose call or request ended with status `code`."""
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(Status(StatusCode.ERROR, description))


def client_span_failed(span: trace.Span, exc: grpc.RpcError) -> None:
    span_failed(span, exc.code().value[0], f"{type(exc).__name__}: {exc.details()}")


class _TraceIds(logging.Filter):
    """Puts the current trace and span ids on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.otel_trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        record.otel_span_id = format(ctx.span_id, "016x") if ctx.is_valid else "-"
        return True


class _StreamContextNoise(logging.Filter):
    """Keeps OpenTelemetry's "Failed to detach context" at DEBUG. grpc.aio finishes a stream
    handler its client cancelled by letting the garbage collector close the generator, in a
    copy of the task's context, so the tracing interceptor's context token cannot be reset
    there (opentelemetry-python-contrib#2357, grpc#42295). The span is ended all the same;
    only the reset of a context nobody uses any more fails, once per cancelled stream."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to detach context"):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_TraceIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    context_log = logging.getLogger("opentelemetry.context")
    if not any(isinstance(f, _StreamContextNoise) for f in context_log.filters):
        context_log.addFilter(_StreamContextNoise())
