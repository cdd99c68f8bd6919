"""Server bootstrap shared by every service.

`ServiceHost` builds a `grpc.aio` server with the tracing and error interceptors,
serves `grpc.health.v1.Health` and server reflection, and binds its listen
address (port 0 picks a free port). `run_service` runs a host until SIGTERM or
SIGINT, then marks every service NOT_SERVING, drains in-flight calls within a
grace period, runs the service's own cleanup and returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from . import heap
from .auth import AuthInterceptor
from .metrics import MetricsEndpoint, new_registry, probe_loop_lag
from .security import Security
from .settings import from_env
from .status import ErrorInterceptor
from .telemetry import server_interceptor, setup_logging

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PARENT_PID_ENV = "LLMOS_PARENT_PID"

# HTTP/2 streams one connection may have open at once: more are refused (RST_STREAM REFUSED_STREAM)
# before any handler runs, so a client that opens and resets streams as fast as it can (a "rapid
# reset" flood) takes a bounded share of the server, as nginx's 128 and Go's 250 do. The public
# port (the gateway's, reached without a certificate) allows fewer than internal ones, whose
# clients multiplex every stream to a worker over one connection. grpc-core counts against the
# limit every stream whose call the server has not yet released, not only open ones: a client
# whose streams all end at once (fixed-length generations started together) and reopen at once
# holds up to twice its concurrency there while the server's loop is busy. With a limit of 100 a
# client at 64 streams was refused now and then; 256 serves one at up to 128 without a refusal.
PUBLIC_STREAMS_PER_CONNECTION = 256
INTERNAL_STREAMS_PER_CONNECTION = 4096
# A public connection is sent GOAWAY after living this long (±10%) and closed after the grace,
# and closed once idle this long: a client cannot hold one for ever. Clients reconnect unnoticed.
PUBLIC_CONNECTION_AGE_MS = 30 * 60 * 1000
PUBLIC_CONNECTION_GRACE_MS = 10 * 60 * 1000
PUBLIC_CONNECTION_IDLE_MS = 15 * 60 * 1000


def server_options(public: bool) -> list[tuple[str, int]]:
    """The transport limits of every llmos gRPC server (grpcio's channel arguments)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               # A port in use is an error, not a port shared with a stale server.
               ("grpc.so_reuseport", 0),
               ("grpc.max_concurrent_streams",
                PUBLIC_STREAMS_PER_CONNECTION if public else INTERNAL_STREAMS_PER_CONNECTION),
               # Keepalive pings more often than once a minute (or any without a call open) are
               # strikes; past two, GOAWAY ENHANCE_YOUR_CALM and the connection is closed.
               ("grpc.http2.min_ping_interval_without_data_ms", 60_000),
               ("grpc.http2.max_ping_strikes", 2),
               ("grpc.keepalive_permit_without_calls", 0)]
    if public:
        options += [("grpc.max_connection_age_ms", PUBLIC_CONNECTION_AGE_MS),
                    ("grpc.max_connection_age_grace_ms", PUBLIC_CONNECTION_GRACE_MS),
                    ("grpc.max_connection_idle_ms", PUBLIC_CONNECTION_IDLE_MS)]
    return options


def die_with_parent(environ: dict[str, str] | None = None) -> None:
    """When started by a launcher (LLMOS_PARENT_PID), ask Linux for SIGTERM when it dies."""
    parent = (os.environ if environ is None else environ).get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# The health service name a liveness probe asks about: SERVING while the process serves at
# all, whatever it can do. The overall status ("") is readiness: SERVING only while it can
# serve (its store reachable, its scheduler reachable, registered, ...) and is not stopping.
LIVENESS = "liveness"


class ServiceHost:
    """One gRPC server with health, reflection and the shared interceptors: tracing, errors
    made statuses, and the authorization of every call (`security`; without one, nothing but
    health and reflection is allowed). A `public` host asks its clients for no certificate."""

    def __init__(self, name: str, listen: str, provider: TracerProvider, metrics_listen: str = "",
                 security: Security | None = None, public: bool = False, health_listen: str = "") -> None:
        self.name = name
        self.listen = listen
        # A plaintext port serving nothing but the health service, for probes that cannot
        # speak mTLS (a kubelet's); "" serves none.
        self.health_listen = health_listen
        self.health_address = ""
        self.provider = provider
        self.security = security or Security(name)
        self.public = public
        # This service's Prometheus metrics, served at `metrics_listen` once started ("" serves none).
        self.metrics = new_registry()
        self.metrics_listen = metrics_listen
        self.server = grpc.aio.server(
            interceptors=[server_interceptor(provider), ErrorInterceptor(),
                          AuthInterceptor(self.security.guard)],
            options=server_options(public))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._health_server: grpc.aio.Server | None = None
        self._services: list[str] = []
        # Whether it can serve (see `set_serving`), and whether it is up and not stopping.
        self._serving = True
        self._up = False
        # Set as it begins to stop: calls that carry many requests take no more.
        self.stopping = asyncio.Event()

    @classmethod
    def of(cls, name: str, settings: object, provider: TracerProvider, security: Security | None = None,
           public: bool = False) -> ServiceHost:
        """The host a service's settings describe: its listen, metrics and health addresses."""
        return cls(name, settings.listen, provider, settings.metrics_listen,
                   security=security or Security.of(name, settings), public=public,
                   health_listen=settings.health_listen)

    def add(self, service_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Registers a servicer; `service_name` is its full proto name."""
        register(self.server)
        self._services.append(service_name)

    async def start(self) -> str:
        """Binds, starts, marks every service SERVING; returns the bound "host:port"."""
        reflection.enable_server_reflection(
            [*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        host = self.listen.rsplit(":", 1)[0]
        try:
            port = self.security.bind(self.server, self.listen, self.public)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"{self.name} cannot listen on {self.listen}: the address is in use or invalid")
        await self.server.start()
        if self.health_listen:
            self._health_server = grpc.aio.server(options=server_options(public=True))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_port = self._health_server.add_insecure_port(self.health_listen)
            if health_port == 0:
                raise OSError(f"{self.name} cannot serve health on {self.health_listen}: in use or invalid")
            await self._health_server.start()
            self.health_address = f"{self.health_listen.rsplit(':', 1)[0]}:{health_port}"
        self._up = True
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_all(self._health())
        log.info("%s %s on %s:%d", self.name, "serving" if self._serving else "listening (not serving yet)",
                 host, port)
        return f"{host}:{port}"

    async def set_serving(self, serving: bool) -> None:
        """Says whether the service can serve now (its store is reachable, ...): health reports
        SERVING only while it can and is not stopping."""
        self._serving = serving
        if self._up:
            await self._set_all(self._health())

    def _health(self) -> int:
        ok = self._up and self._serving
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def stop(self, grace: float) -> None:
        """Marks NOT_SERVING, then lets in-flight calls finish for up to `grace` seconds."""
        self._up = False
        self.stopping.set()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._health_server is not None:
            await self._health_server.stop(0)

    async def _set_all(self, status: int) -> None:
        for service in ["", *self._services]:
            await self.health.set(service, status)


async def follow_peer(host: ServiceHost, channel: grpc.aio.Channel | list[grpc.aio.Channel], peer: str,
                      interval: float = 2.0) -> None:
    """Keeps `host` ready only while `peer` (on `channel`, or on any of several: its replicas)
    answers its health check SERVING: a service that cannot work without it says so to its
    load balancer."""
    stubs = [health_pb2_grpc.HealthStub(c) for c in (channel if isinstance(channel, list) else [channel])]

    async def serving(stub: health_pb2_grpc.HealthStub) -> bool:
        try:
            return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=max(1.0, interval))).status == \
                health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001 - unreachable, in whatever way
            return False

    reachable: bool | None = None
    while True:
        ok = any(await asyncio.gather(*(serving(stub) for stub in stubs)))
        if ok != reachable:
            if reachable is not None or not ok:
                (log.info if ok else log.warning)("%s %s: %s", peer, "is serving" if ok else "is not serving",
                                                  "ready" if ok else "not ready until it is")
            await host.set_serving(ok)
            reachable = ok
        await asyncio.sleep(interval)


def write_address_file(path: str, address: str, metrics_address: str = "", http_address: str = "") -> None:
    """Writes the bound gRPC address (first line), metrics address (second line, when served)
    and HTTP door (third line, the gateway's) atomically, so a launcher never reads half of it."""
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(f"{address}\n{metrics_address}\n{http_address}\n")
    os.replace(tmp, target)


def read_address_file(path: str | Path) -> tuple[str, str]:
    """(gRPC address, metrics address or "") from a file `write_address_file` wrote."""
    lines = Path(path).read_text().splitlines()
    return lines[0].strip(), (lines[1].strip() if len(lines) > 1 else "")


def read_http_address(path: str | Path) -> str:
    """The HTTP door's address from a file `write_address_file` wrote ("" when none)."""
    lines = Path(path).read_text().splitlines()
    return lines[2].strip() if len(lines) > 2 else ""


class Door(Protocol):
    """A server beside the gRPC one, in the same process and loop (the gateway's HTTP door)."""

    async def start(self) -> str:
        """Binds and serves; returns the bound "host:port"."""

    async def stop(self, grace: float) -> None:
        """Stops taking requests and lets those in flight finish for up to `grace` seconds."""


@dataclass
class Service:
    """A built service: its host, what it runs in the background once it serves (each given
    the bound address; loops are cancelled at stop), and how to clean up."""

    host: ServiceHost
    background: list[Callable[[str], Awaitable[None]]] = field(default_factory=list)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What runs first at stop, before draining (a leader hands its lead over).
    handovers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    door: Door | None = None
    # Where the door serves, once started ("" when none).
    http_address: str = field(default="", init=False)
    # Where its Prometheus metrics are served, once started ("" when not served).
    metrics_address: str = field(default="", init=False)
    _metrics: MetricsEndpoint | None = field(default=None, init=False, repr=False)
    _tasks: list[asyncio.Task] = field(default_factory=list, init=False, repr=False)

    async def start(self) -> str:
        address = await self.host.start()
        if self.host.metrics_listen:
            self._metrics = MetricsEndpoint(self.host.metrics, self.host.metrics_listen)
            self.metrics_address = self._metrics.start()
        if self.door is not None:
            self.http_address = await self.door.start()
        self._tasks = [asyncio.create_task(loop(address)) for loop in self.background]
        self._tasks.append(asyncio.create_task(probe_loop_lag(self.host.metrics)))
        return address

    async def stop(self, grace: float) -> None:
        """Marks NOT_SERVING, drains for up to `grace` seconds, ends the background loops,
        then cleans up."""
        log.info("%s stopping: draining for up to %.1fs", self.host.name, grace)
        for handover in self.handovers:
            try:
                await handover()
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("handing over failed while stopping %s", self.host.name)
        if self.door is not None:
            await self.door.stop(grace)
        await self.host.stop(grace)
        pending = set(self._tasks)
        for _ in range(100):            # again while any goes on: asyncio.wait_for (3.11) can lose a cancel
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1) if pending else (set(), set())
            if not pending:
                break
        else:
            log.warning("%s: %d background loops did not stop", self.host.name, len(pending))
        for task in self._tasks:        # (an error a loop ended with is heard here, as gather would)
            if task.done() and not task.cancelled():
                task.exception()
        for cleanup in self.cleanups:
            try:
                await cleanup()
            except Exception:  # noqa: BLE001 - cleanup must go on
                log.exception("cleanup failed while stopping %s", self.host.name)
        if self._metrics is not None:
            self._metrics.stop()
        self.host.security.close()
        self.host.provider.shutdown()
        log.info("%s stopped", self.host.name)


async def run_service(service: Service, *, address_file: str = "", grace: float = 10.0,
                      stop: asyncio.Event | None = None, settle: bool = False) -> None:
    """Runs `service` until SIGTERM or SIGINT (or until `stop` is set, when the caller
    handles signals itself), then drains and cleans up. With `settle` (a service's own process),
    what the started service holds is frozen out of the garbage collector's walks (`heap`)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    address = await service.start()
    if settle:
        heap.settle()
    if address_file:
        write_address_file(address_file, address, service.metrics_address, service.http_address)
    await stop.wait()
    await service.stop(grace)


def serve_main(name: str, settings_type: type, build: Callable[..., Awaitable[Service]]) -> None:
    """The body of every service's `__main__`: settings from the environment, then serve."""
    die_with_parent()
    settings = from_env(settings_type, name)
    setup_logging(settings.log_level)

    async def run() -> None:
        await run_service(await build(settings), address_file=settings.address_file,
                          grace=settings.grace_seconds, settle=True)

    run_loop(run())


def run_loop(main: Coroutine[None, None, None]) -> None:
    """Runs a service's event loop to the end of `main`: libuv's loop (uvloop), not asyncio's own.
    Every token a stream relays costs each service on its way a few loop wake-ups; at 64 streams
    the gateway spent a fifth less CPU so, which went to the engine sharing its cores."""
    uvloop.run(main)
