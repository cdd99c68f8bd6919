"""The gateway's telemetry: what a client sees of each Generate.

Each call gets a span named as the OpenTelemetry GenAI conventions name inference
spans ("{operation} {model}", e.g. "chat smollm2-135m-instruct"), under the RPC's
server span, with the `gen_ai.*` attributes: operation, model, request
parameters, usage, finish reasons and the time to the first chunk. It is the
handler's own, so it ends after the handler saw how the call ended (a client's
cancellation included), whatever the interceptor's span does.
Metrics: requests by status code, time to first token and duration as the
client sees them (queue and cold start included), tokens streamed, each by the model name
the client gave and the version that served it (`model_version`: an alias resolved, an
adapter; "" when none was reached), so a canary's versions compare; per tenant, requests,
tokens and quota refusals by limit. Label values a caller chooses are bounded: a model is
named only once it has streamed a token here (others count as "other"), tenants come from
the key store.
"""

from __future__ import annotations

import asyncio
import time

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from llmos.common.domain import Chunk
from llmos.common.errors import LlmosError
from llmos.common.metrics import LATENCY_BUCKETS

from .frontdoor import Assignment, GenerateCall

# The model label of requests for models that never streamed here (unknown names included).
OTHER_MODEL = "other"
MAX_MODEL_LABELS = 1000
QUOTA_LIMITS = frozenset({"max_concurrent_requests", "requests_per_minute", "tokens_per_minute"})


class GatewayTelemetry:
    def __init__(self, tracer: trace.Tracer, registry: CollectorRegistry) -> None:
        self.tracer = tracer
        self.requests = Counter("llmos_gateway_requests", "Generate calls that ended, by gRPC status code.",
                                ["model_name", "model_version", "code"], registry=registry)
        self.ttft = Histogram("llmos_gateway_time_to_first_token_seconds", "Time from a Generate call's "
                              "arrival to its first token going out.", ["model_name", "model_version"],
                              registry=registry,
                              buckets=LATENCY_BUCKETS)
        self.duration = Histogram("llmos_gateway_request_duration_seconds", "Time from a Generate call's "
                                  "arrival to its end.", ["model_name", "model_version", "code"], registry=registry,
                                  buckets=LATENCY_BUCKETS)
        self.streamed = Counter("llmos_gateway_streamed_tokens", "Tokens streamed to clients.",
                                ["model_name", "model_version"], registry=registry)
        self.tenant_requests = Counter("llmos_tenant_requests", "Generate calls that ended, by tenant and "
                                       "gRPC status code.", ["tenant", "code"], registry=registry)
        self.tenant_tokens = Counter("llmos_tenant_tokens", "Tokens served, by tenant and kind "
                                     "(prompt, completion).", ["tenant", "kind"], registry=registry)
        self.quota_rejections = Counter("llmos_tenant_quota_rejections", "Requests refused by a tenant's "
                                        "quota, by limit.", ["tenant", "limit"], registry=registry)
        self.known_models: set[str] = set()

    def model_label(self, model: str) -> str:
        return model if model in self.known_models else OTHER_MODEL

    def start(self, call: GenerateCall, requested_priority: int | None = None) -> CallWatch:
        return CallWatch(self, call, requested_priority)


class CallWatch:
    """One Generate call, from arrival to end: a context manager around the stream."""

    def __init__(self, telemetry: GatewayTelemetry, call: GenerateCall, requested_priority: int | None = None) -> None:
        self._t = telemetry
        self._model = call.model
        self.version = ""               # the version that serves it, once admitted
        self._tenant = call.tenant
        self._started = time.perf_counter()
        self._first = 0.0
        self._tokens = 0
        # (OpenTelemetry's gen_ai operation names; classify and score are llmos's own)
        operation = (call.pooling.task.replace("embed", "embeddings") if call.pooling is not None
                     else "chat" if call.source.messages else "text_completion")
        p = call.params
        attributes = {"gen_ai.operation.name": operation,
                      "gen_ai.provider.name": "llmos", "gen_ai.request.model": call.model,
                      "llmos.tenant": call.tenant, "llmos.priority": call.priority}
        for key, value in (("max_tokens", p.max_tokens), ("temperature", p.temperature), ("top_p", p.top_p),
                           ("top_k", p.top_k), ("seed", p.seed)):
            if value is not None:
                attributes[f"gen_ai.request.{key}"] = value
        if p.stop:
            attributes["gen_ai.request.stop_sequences"] = list(p.stop)
        if requested_priority is not None and requested_priority != call.priority:
            attributes["llmos.priority.requested"] = requested_priority
            attributes["llmos.priority.lowered_to_ceiling"] = True
        self._span = telemetry.tracer.start_span(f"{operation} {call.model}", attributes=attributes)
        self._scope = trace.use_span(self._span, end_on_exit=True, record_exception=False,
                                     set_status_on_exception=False)

    def __enter__(self) -> CallWatch:
        self._scope.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.end(exc)
        self._scope.__exit__(kind, exc, tb)

    def routed(self, assignment: Assignment, request_id: str) -> None:
        """The scheduler admitted the call to `assignment` (the version its model name stands for);
        `request_id` is the call's own id, as the scheduler's and the worker's spans name it."""
        self.version = assignment.version
        attributes = {"gen_ai.response.model": self.version, "llmos.model.version": self.version,
                      "llmos.request.id": request_id}
        if assignment.alias:
            attributes["llmos.model.alias"] = assignment.alias
        if assignment.adapter:
            attributes["llmos.adapter"] = assignment.adapter
        self._span.set_attributes(attributes)

    def chunk(self, request_id: str, chunk: Chunk) -> None:
        if not self._first:
            self._first = time.perf_counter()
            if self._model not in self._t.known_models and len(self._t.known_models) < MAX_MODEL_LABELS:
                self._t.known_models.add(self._model)
            ttft = self._first - self._started
            self._t.ttft.labels(self._model, self.version).observe(ttft)
            self._span.set_attributes({"gen_ai.response.id": request_id,
                                       "gen_ai.response.time_to_first_chunk": ttft})
        self._tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self._span.set_attribute("gen_ai.response.finish_reasons", [chunk.finish_reason.name.lower()])
            if chunk.usage is not None:
                self._span.set_attributes({"gen_ai.usage.input_tokens": chunk.usage.prompt_tokens,
                                           "gen_ai.usage.output_tokens": chunk.usage.completion_tokens,
                                           "gen_ai.usage.cache_read.input_tokens": chunk.usage.cached_prompt_tokens})
                self._t.tenant_tokens.labels(self._tenant, "prompt").inc(chunk.usage.prompt_tokens)
                self._t.tenant_tokens.labels(self._tenant, "completion").inc(chunk.usage.completion_tokens)

    def end(self, exc: BaseException | None) -> None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, LlmosError):
            code = exc.code
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        else:
            code = "INTERNAL"
        if code == "CANCELLED":
            self._span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])
        elif code != "OK":
            self._span.set_attributes({"error.type": code, "llmos.error.reason": getattr(exc, "reason", "")})
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        model = self._t.model_label(self._model)
        self._t.requests.labels(model, self.version, code).inc()
        self._t.duration.labels(model, self.version, code).observe(time.perf_counter() - self._started)
        self._t.tenant_requests.labels(self._tenant, code).inc()
        if getattr(exc, "reason", "") == "QUOTA_EXCEEDED":
            limit = exc.metadata.get("limit", "")
            self._t.quota_rejections.labels(self._tenant, limit if limit in QUOTA_LIMITS else "other").inc()
        if self._tokens:
            self._t.streamed.labels(model, self.version).inc(self._tokens)
