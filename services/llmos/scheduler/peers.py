"""The scheduler's port to the registry: where a model is ready, and cold starts.

Failures arrive as typed errors (`LlmosError`) from the channels' interceptor.
"""

from __future__ import annotations

from opentelemetry import trace

from llmos.common.channels import Channels
from llmos.common.convert import duration
from llmos.v1 import common_pb2, registry_pb2, registry_pb2_grpc

from .admission import Resolution
from .rotation import Endpoint


def _within(limit: float, remaining: float | None) -> float:
    """The call's own limit, or less when the caller's deadline is nearer."""
    return limit if remaining is None else min(limit, remaining)


def _ready(model: common_pb2.Model) -> list[Endpoint]:
    return [Endpoint(p.worker_id, p.worker_address) for p in model.placements
            if p.state == common_pb2.Model.STATE_READY]


class GrpcRegistry:
    """The scheduler's port to the registry."""

    def __init__(self, channels: Channels, address: str, load_timeout: float,
                 tracer: trace.Tracer | None = None) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channels.get(address))
        self._load_timeout = load_timeout
        self._tracer = tracer or trace.NoOpTracer()

    async def resolve(self, name: str, timeout: float | None, route_key: str = "") -> Resolution:
        response = await self._stub.GetModel(registry_pb2.GetModelRequest(name=name, route_key=route_key),
                                             timeout=_within(5.0, timeout))
        model = response.model
        if model.base:          # an adapter: run by its base's workers
            return Resolution(model.base, _ready(model), response.alias, f"{model.name}:{model.tag}",
                              model.store_path)
        return Resolution(f"{model.name}:{model.tag}", _ready(model), response.alias)

    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        response = await self._stub.GetModel(registry_pb2.GetModelRequest(name=model),
                                             timeout=_within(5.0, timeout))
        return f"{response.model.name}:{response.model.tag}", _ready(response.model)

    async def placements(self, timeout: float) -> dict[str, list[Endpoint]]:
        """Every model ready somewhere, with its workers (a new leader's first look)."""
        ready: dict[str, list[Endpoint]] = {}
        token = ""
        while True:
            response = await self._stub.ListModels(registry_pb2.ListModelsRequest(page_size=1000, page_token=token),
                                                   timeout=timeout)
            for model in response.models:
                endpoints = _ready(model)
                if endpoints and not model.base:
                    ready[f"{model.name}:{model.tag}"] = endpoints
            token = response.next_page_token
            if not token:
                return ready

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None,
                   hold: bool = False) -> list[Endpoint]:
        # A hold is of a keep-alive: a user's cold start without one only loads the model.
        request = registry_pb2.LoadModelRequest(name=model, hold=hold and keep_alive is not None)
        if keep_alive is not None:
            request.keep_alive.CopyFrom(duration(keep_alive))
        with self._tracer.start_as_current_span("cold start", attributes={"gen_ai.request.model": model}) as span:
            response = await self._stub.LoadModel(request, timeout=_within(self._load_timeout, timeout))
            endpoints = _ready(response.model)
            span.set_attribute("llmos.workers_ready", len(endpoints))
        return endpoints
