"""A small synchronous client for the llmos suite, used by the CLI and the tests.

It presents an API key (`authorization: Bearer`) on every call, and reaches the internal
services (registry, resources, monitor) over mTLS with the CLI's certificate; the gateway's
public port on loopback is plaintext.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from llmos.common import tls
from llmos.common.bootstrap import CLI, SuiteIdentity
from llmos.common.security import over_tls
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    identity_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2,
    resources_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str) -> None:
        self._metadata = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def open_channel(address: str, tls_dir: str | Path | None = None, api_key: str | None = None,
                 public: bool = False) -> grpc.Channel:
    """A channel to one service: mTLS with the certificate in `tls_dir` (a public port on
    loopback is plaintext), every call carrying `api_key`."""
    if over_tls(tls_dir, address, public):
        files = tls.TlsFiles.read(tls_dir)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(files.ca, files.key, files.cert))
    else:
        channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _Bearer(api_key)) if api_key else channel


def every_page(method, request, field: str, timeout: float = 10) -> Iterator:
    """Every item of a paged List RPC (AIP-158), asking for one page after another."""
    while True:
        page = method(request, timeout=timeout)
        yield from getattr(page, field)
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def local_credentials(data_dir: str | Path, api_key: str = "") -> tuple[str | None, Path | None]:
    """(the key given, else the local admin key `llmos up` keeps in `data_dir`; the CLI's
    certificate directory there), each None where there is none."""
    identity = SuiteIdentity(Path(data_dir).resolve())
    if not api_key and identity.admin_key_file.exists():
        api_key = identity.admin_key()
    tls_dir = identity.tls_dir(CLI)
    return api_key or None, tls_dir if tls_dir.exists() else None


class Client:
    def __init__(self, gateway: str = "127.0.0.1:50051", registry: str = "127.0.0.1:50053",
                 resources: str = "127.0.0.1:50054", monitor: str = "127.0.0.1:50056", *,
                 api_key: str | None = None, tls_dir: str | Path | None = None,
                 scheduler: str = "127.0.0.1:50052") -> None:
        self._channels = [open_channel(a, tls_dir, api_key, public=a == gateway)
                          for a in (gateway, registry, resources, monitor, scheduler)]
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._channels[0])
        self.identity = identity_pb2_grpc.IdentityServiceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels[1])
        self.resources = resources_pb2_grpc.ResourceServiceStub(self._channels[2])
        self.monitor = monitor_pb2_grpc.MonitorServiceStub(self._channels[3])
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channels[4])

    @classmethod
    def of_args(cls, args) -> Client:
        """A client as the `llmos` command's flags say (addresses, --api-key, --data-dir)."""
        key, tls_dir = local_credentials(args.data_dir, args.api_key)
        return cls(gateway=args.gateway, registry=args.registry, resources=args.resources, monitor=args.monitor,
                   scheduler=args.scheduler, api_key=key, tls_dir=tls_dir)

    @classmethod
    def of_suite(cls, addresses: dict[str, str], identity: SuiteIdentity, api_key: str | None = None) -> Client:
        """A client for a suite started by `llmos.suite.Suite` (its `addresses` and identity), with
        the CLI's certificate and the local admin key unless another is given."""
        return cls(gateway=addresses["gateway"], registry=addresses["registry"],
                   resources=addresses["resources"], monitor=addresses["monitor"], scheduler=addresses["scheduler"],
                   api_key=api_key or identity.admin_key(), tls_dir=identity.tls_dir(CLI))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, model: str, *, prompt: str | None = None,
                 messages: list[tuple[str, str]] | None = None, max_tokens: int = 0,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
                 request_id: str = "", timeout: float | None = None,
                 metadata: tuple = ()) -> Iterator[gateway_pb2.GenerateResponse]:
        request = gateway_pb2.GenerateRequest(
            model=model, request_id=request_id,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
        if seed is not None:
            request.sampling.seed = seed
        if prompt is not None:
            request.prompt = prompt
        for role, content in messages or ():
            request.messages.add(role=role, content=content)
        return self.gateway.Generate(request, timeout=timeout, metadata=metadata)

    def import_model(self, name: str, source: str, tag: str = "",
                     timeout: float = 600) -> registry_pb2.ImportModelResponse:
        return self.registry.ImportModel(registry_pb2.ImportModelRequest(name=name, tag=tag, source=source),
                                         timeout=timeout)

    def load_model(self, name: str, timeout: float = 600, quantize: str = "") -> registry_pb2.LoadModelResponse:
        return self.registry.LoadModel(registry_pb2.LoadModelRequest(name=name, quantize=quantize), timeout=timeout)

    def unload_model(self, name: str, timeout: float = 120) -> registry_pb2.UnloadModelResponse:
        return self.registry.UnloadModel(registry_pb2.UnloadModelRequest(name=name), timeout=timeout)

    def get_model(self, name: str) -> common_pb2.Model:
        return self.registry.GetModel(registry_pb2.GetModelRequest(name=name), timeout=10).model

    def list_models(self) -> list[common_pb2.Model]:
        return list(every_page(self.registry.ListModels, registry_pb2.ListModelsRequest(), "models"))

    def scheduler_stats(self) -> scheduler_pb2.GetSchedulerStatsResponse:
        return self.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(), timeout=10)

    def cluster_health(self) -> monitor_pb2.GetClusterHealthResponse:
        return self.monitor.GetClusterHealth(monitor_pb2.GetClusterHealthRequest(), timeout=10)

    def nodes(self) -> list[resources_pb2.Node]:
        return list(every_page(self.resources.ListNodes, resources_pb2.ListNodesRequest(), "nodes"))
